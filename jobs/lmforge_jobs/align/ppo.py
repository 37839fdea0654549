"""RLHF with PPO, written out (TRL removed its PPO trainer upstream). Reads top to bottom as the algorithm.

Each iteration:

1. **Rollout** — sample a response for ``rolloutBatchSize`` prompts from the current policy (chat template
   with a generation prompt, ``temperature``, at most ``maxNewTokens``; everything after the first eos is
   masked out; prompts keep their last ``maxLength − maxNewTokens`` tokens).
2. **Score** — the reward model (the output of a ``method: reward`` AlignmentRun) gives each prompt + response
   one scalar.
3. **Old log-probs, values, reference log-probs** — under the policy as it was when sampling, its value
   head, and the frozen reference policy (the base model; with LoRA the same network with the adapter
   switched off, so no second copy is held).
4. **Per-token rewards** — ``-klCoef · (log π − log π_ref)`` on every response token, plus the score on
   the last one.
5. **GAE** — advantages ``A_t = Σ (γλ)^k δ_{t+k}`` with ``δ_t = r_t + γ V_{t+1} − V_t``; returns ``A + V``;
   advantages whitened over the batch.
6. **Update** — ``ppoEpochs`` passes over the rollout in minibatches of ``batchSize`` (dropout off, like
   the rollout, so ``ρ = 1`` before the first step): the clipped
   surrogate ``max(−A·ρ, −A·clip(ρ, 1±ε))`` with ``ρ = π/π_old``, plus ``valueCoef`` × the clipped value
   loss ``½·max((V−R)², (clip(V, V_old±ε_v)−R)²)``.

Metrics each iteration: meanReward (reward-model score), kl (per sequence, summed over tokens), entropy,
clipFraction, loss, valueLoss, policyLoss, responseLength; on held-out prompts (dataset.evalFraction) the
mean reward before training (initialEvalMeanReward) and after it (evalMeanReward). Checkpoints (trainable weights, value head,
optimizer, iteration) go to ``output/checkpoints/ppo-<iteration>`` every ``checkpoint.everySteps``
iterations, and after the current iteration when SIGTERM/SIGINT arrives (then :class:`.trainers.Stopped`:
the job exits 143); published like the trainers' (:mod:`.checkpoints`, marker last, uploaded when the output is
remote), and a rerun resumes from the newest.
Under torchrun each process rolls out its own share of the prompts and gradients are averaged.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge_jobs.align import checkpoints
from lmforge_jobs.align.config import AlignmentRunSpec
from lmforge_jobs.align.data import Split
from lmforge_jobs.align.models import peft_config
from lmforge_jobs.align.trainers import Stopped, any_rank
from lmforge_jobs.launch import StopFlag
from lmforge_jobs.telemetry import Telemetry


# ------------------------------------------------------------------------------------------------ model
class PolicyWithValue(nn.Module):
    """A causal LM (optionally PEFT-wrapped) and a scalar value head on its last hidden state."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        hidden = policy.config.hidden_size  # type: ignore[union-attr]
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        if hidden.shape[1] != input_ids.shape[1]:  # prompt tuning prepends virtual tokens
            hidden = hidden[:, -input_ids.shape[1] :]
        logits = out.logits[:, -input_ids.shape[1] :]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def reference_context(policy: nn.Module, has_lora: bool) -> AbstractContextManager[Any]:
    """Inside it the policy network is the frozen reference (LoRA adapters disabled)."""
    return policy.disable_adapter() if has_lora else nullcontext()  # type: ignore[operator]


# --------------------------------------------------------------------------------------------- helpers
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(token_t | tokens_<t) for the response tokens; ``logits`` already aligned with ``tokens``."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns over the response tokens (mask = real tokens)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < length else 0)
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def response_mask(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first eos, 0 after it."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~after_eos
    if pad_id != eos_id:
        mask &= responses != pad_id
    return mask.float()


# ---------------------------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """Prompts (left-padded) followed by sampled responses; ``mask`` marks the real response tokens."""

    prompts: list[Any]
    input_ids: torch.Tensor
    attention: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    q_len: int


def rollout(
    model: PolicyWithValue,
    tokenizer: Any,
    prompts: list[Any],
    cfg: Any,
    max_prompt_tokens: int,
    device: torch.device,
    autocast: Any,
) -> Rollout:
    """Sample one response per prompt (chat template with a generation prompt; long prompts keep their end)."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    try:
        enc = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_prompt_tokens,
            add_special_tokens=False,
        ).to(device)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.no_grad(), autocast():
        generated = model.policy.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
    q_len = enc["input_ids"].shape[1]
    responses = generated[:, q_len:]
    mask = response_mask(responses, eos_id, pad_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_id))
    return Rollout(
        prompts=prompts,
        input_ids=torch.cat([enc["input_ids"], responses], dim=1),
        attention=torch.cat([enc["attention_mask"], mask.long()], dim=1),
        responses=responses,
        mask=mask,
        q_len=q_len,
    )


def score(
    reward_model: nn.Module,
    reward_tokenizer: Any,
    tokenizer: Any,
    ro: Rollout,
    max_length: int,
    device: torch.device,
    autocast: Any,
) -> torch.Tensor:
    """The reward model's scalar for each prompt + response, formatted with the reward model's chat template."""
    answers = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True)
        for r, m in zip(ro.responses, ro.mask, strict=True)
    ]
    texts = [
        reward_tokenizer.apply_chat_template([*p, {"role": "assistant", "content": a}], tokenize=False)
        for p, a in zip(ro.prompts, answers, strict=True)
    ]
    reward_tokenizer.truncation_side = "left"
    enc = reward_tokenizer(
        texts,
        return_tensors="pt",
        padding=True,
        truncation=True,
        max_length=max_length,
        add_special_tokens=False,
    ).to(device)
    with torch.no_grad(), autocast():
        return reward_model(**enc).logits[:, 0].float()


# ------------------------------------------------------------------------------------------------ state
def _checkpoints(output: str) -> list[Path]:
    root = Path(output) / "checkpoints"
    done = [p for p in root.glob("ppo-*") if (p / "state.pt").exists() and p.name[4:].isdigit()]
    return sorted(done, key=lambda p: int(p.name[4:]))


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def save_checkpoint(
    output: str, iteration: int, model: nn.Module, opt: torch.optim.Optimizer, keep: int
) -> None:
    """Trainable weights + value head + optimizer + iteration; the state file is written last (the marker)."""
    path = Path(output) / "checkpoints" / f"ppo-{iteration}"
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "iteration": iteration,
        "model": _trainable_state(model),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    for old in _checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(output: str, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Restore the newest checkpoint; return the iteration to start from (0 when none)."""
    found = _checkpoints(output)
    if not found:
        return 0
    state = torch.load(found[-1] / "state.pt", map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=False)
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    print(f"resuming PPO from {found[-1]}", flush=True)
    return int(state["iteration"])


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each number over all processes (the numbers themselves in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def _init_distributed() -> tuple[int, int, torch.device]:
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ------------------------------------------------------------------------------------------------- loop
def train_ppo(
    spec: AlignmentRunSpec,
    policy: nn.Module,
    tokenizer: Any,
    reward_model: nn.Module,
    reward_tokenizer: Any,
    split: Split,
    output: str,
    tel: Telemetry,
) -> nn.Module:
    """Run PPO; return the trained policy (PEFT-wrapped when spec.peft is set)."""
    hp, cfg = spec.hyperparameters, spec.hyperparameters.ppo
    rank, world, device = _init_distributed()
    from lmforge_jobs.align.trainers import use_bf16

    # bf16 autocast on GPUs when the spec asks for it (weights and optimizer state stay fp32)
    autocast: Any = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if use_bf16(spec) and device.type == "cuda"
        else nullcontext
    )
    torch.manual_seed(hp.seed + rank)
    random.seed(hp.seed)

    # Policy (+ adapters) with a value head; the reference is the base network, frozen.
    has_lora = spec.peft is not None and spec.peft.lora is not None
    reference: nn.Module | None = None
    if not has_lora:
        import copy

        reference = copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    if spec.peft is not None:
        from peft import get_peft_model

        policy = get_peft_model(
            policy, peft_config(spec.peft, "CAUSAL_LM", getattr(tokenizer, "name_or_path", None))
        )
    model = PolicyWithValue(policy).to(device)
    reward_model = reward_model.eval().requires_grad_(False).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)

    prompts = [rec["prompt"] for rec in split.train][rank::world] or [split.train[0]["prompt"]]
    per_rollout = max(1, cfg.rollout_batch_size // world)
    iterations = hp.max_steps or max(1, math.ceil(hp.epochs * len(split.train) / cfg.rollout_batch_size))
    checkpoints.restore(str(spec.output), output, "ppo")  # a remote output's newest, into output
    start = load_checkpoint(output, model, opt)
    tel.update(step=start, total_steps=iterations, stage="train", force=True)
    order: list[int] = []
    tokens_total, t_start = 0, time.monotonic()

    max_prompt = max(8, hp.max_length - cfg.max_new_tokens)
    eval_prompts = [rec["prompt"] for rec in split.eval][: per_rollout * world][rank::world]

    def evaluate(key: str) -> None:
        """Mean reward-model score of responses to held-out prompts."""
        if not eval_prompts:
            return
        model.eval()
        ro = rollout(model, tokenizer, eval_prompts, cfg, max_prompt, device, autocast)
        mean = score(reward_model, reward_tokenizer, tokenizer, ro, hp.max_length, device, autocast).mean()
        tel.update(metrics=_mean_across_ranks({key: mean.item()}), force=True)

    if start == 0:
        evaluate("initialEvalMeanReward")
    with StopFlag() as stop:  # SIGTERM/SIGINT: save after this iteration, then stop
        for iteration in range(start, iterations):
            t0 = time.monotonic()
            # lr: linear warmup then cosine decay, per iteration
            warm = max(1, int(hp.warmup_ratio * iterations))
            scale = (
                (iteration + 1) / warm
                if iteration < warm
                else 0.5 * (1 + math.cos(math.pi * (iteration - warm) / max(1, iterations - warm)))
            )
            for group in opt.param_groups:
                group["lr"] = hp.lr * scale
            rng = random.Random(hp.seed * 1000003 + iteration)
            if len(order) < per_rollout:
                order += rng.sample(range(len(prompts)), len(prompts)) * max(
                    1, math.ceil(per_rollout / len(prompts))
                )
            batch_prompts, order = [prompts[i] for i in order[:per_rollout]], order[per_rollout:]

            # 1. rollout: sample responses from the current policy
            model.eval()
            ro = rollout(model, tokenizer, batch_prompts, cfg, max_prompt, device, autocast)
            input_ids, attention, responses, mask, q_len = (
                ro.input_ids,
                ro.attention,
                ro.responses,
                ro.mask,
                ro.q_len,
            )

            # 2. score each prompt + response with the reward model
            scores = score(reward_model, reward_tokenizer, tokenizer, ro, hp.max_length, device, autocast)

            # 3. log-probs and values when sampled, and log-probs under the reference
            with torch.no_grad(), autocast():
                logits, values = model(input_ids, attention)
                old_logp = token_logprobs(logits[:, q_len - 1 : -1], responses, cfg.temperature)
                old_values = values[:, q_len - 1 : -1]
                if reference is not None:
                    ref_logits = reference(
                        input_ids=input_ids, attention_mask=attention, position_ids=positions(attention)
                    ).logits
                else:
                    with reference_context(model.policy, has_lora):
                        ref_logits = model.policy(
                            input_ids=input_ids, attention_mask=attention, position_ids=positions(attention)
                        ).logits
                ref_logp = token_logprobs(ref_logits[:, q_len - 1 : -1], responses, cfg.temperature)

            # 4. per-token rewards: KL penalty everywhere, the score on the last real token
            kl_tokens = (old_logp - ref_logp) * mask
            rewards = -cfg.kl_coef * kl_tokens
            last = (mask.sum(-1).long() - 1).clamp(min=0)
            rewards[torch.arange(len(last)), last] += scores

            # 5. GAE over the response tokens
            advantages, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
            advantages = whiten(advantages, mask)

            # 6. PPO epochs over minibatches. Dropout stays off (eval mode, as in TRL's PPO): the old log-probs
            # and values were computed without it, so ρ must be exactly 1 before the first update.
            model.eval()
            n = input_ids.shape[0]
            minibatch = max(1, min(n, hp.batch_size // world))
            micro = max(1, min(minibatch, hp.micro_batch_size))
            stats: dict[str, list[float]] = {
                k: [] for k in ("loss", "policyLoss", "valueLoss", "clipFraction", "entropy")
            }
            for _ in range(cfg.ppo_epochs):
                perm = torch.randperm(n, device=device)
                for lo in range(0, n, minibatch):
                    idx = perm[lo : lo + minibatch]
                    opt.zero_grad(set_to_none=True)
                    for mlo in range(0, len(idx), micro):
                        j = idx[mlo : mlo + micro]
                        m = mask[j]
                        with autocast():
                            logits, values = model(input_ids[j], attention[j])
                        logits = logits[:, q_len - 1 : -1]
                        new_logp = token_logprobs(logits, responses[j], cfg.temperature)
                        new_values = values[:, q_len - 1 : -1]
                        ratio = torch.exp(new_logp - old_logp[j])
                        adv = advantages[j]
                        pg = torch.max(
                            -adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
                        )
                        policy_loss = masked_mean(pg, m)
                        v_clipped = old_values[j] + (new_values - old_values[j]).clamp(
                            -cfg.value_clip_range, cfg.value_clip_range
                        )
                        v_loss = 0.5 * torch.max(
                            (new_values - returns[j]) ** 2, (v_clipped - returns[j]) ** 2
                        )
                        value_loss = masked_mean(v_loss, m)
                        loss = policy_loss + cfg.value_coef * value_loss
                        (loss * len(j) / len(idx)).backward()
                        with torch.no_grad():
                            stats["loss"].append(loss.item())
                            stats["policyLoss"].append(policy_loss.item())
                            stats["valueLoss"].append(value_loss.item())
                            stats["clipFraction"].append(
                                masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), m).item()
                            )
                            stats["entropy"].append(
                                masked_mean(entropy_of(logits, cfg.temperature), m).item()
                            )
                    _all_reduce_grads(params)
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()

            # 7. report, checkpoint
            tokens_total += int(attention.sum().item()) * world
            metrics = {k: sum(v) / len(v) for k, v in stats.items() if v}
            metrics = _mean_across_ranks(metrics)
            metrics.update(
                _mean_across_ranks(
                    {
                        "meanReward": scores.mean().item(),
                        "kl": kl_tokens.sum(-1).mean().item(),
                        "responseLength": mask.sum(-1).mean().item(),
                    }
                ),
                tokensPerSecond=attention.sum().item()
                * world
                * cfg.ppo_epochs
                / max(1e-9, time.monotonic() - t0),
                learningRate=hp.lr * scale,
            )
            tel.update(step=iteration + 1, total_steps=iterations, tokens=tokens_total, metrics=metrics)
            done = iteration + 1
            stopping = any_rank(stop.set, device) and done < iterations
            if rank == 0 and (stopping or done % spec.checkpoint.every_steps == 0) and done < iterations:
                save_checkpoint(output, done, model, opt, spec.checkpoint.keep)
                checkpoints.publish(
                    Path(output) / "checkpoints" / f"ppo-{done}", str(spec.output), spec.checkpoint.keep
                )
            if stopping:
                raise Stopped(done)
    tel.update(stage="evaluate", force=True)
    evaluate("evalMeanReward")
    print(f"ppo: {iterations - start} iterations in {time.monotonic() - t_start:.1f}s", flush=True)
    return model.policy


__all__ = [
    "PolicyWithValue",
    "entropy_of",
    "gae",
    "load_checkpoint",
    "response_mask",
    "save_checkpoint",
    "token_logprobs",
    "train_ppo",
    "whiten",
]
