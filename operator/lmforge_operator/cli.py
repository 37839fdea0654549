"""The ``lmforge`` command line.

lmforge validate PATH...      check manifests (files or directories); exit 1 with every problem, 64 with
    [--allow-privileged]      what the operator would refuse (pod templates, GPU resources, stages) as
    [--pod-template-defaults FILE]   `error: spec.<field>: <why>`; the options: the chart's podTemplate values
lmforge crds [--out DIR]      write the CustomResourceDefinitions generated from the spec models
lmforge crds --check [DIR]    exit 1 when DIR differs from what would be generated
lmforge plan FILE...          compute plan of each PretrainRun (parameters, FLOPs, memory, GPU-hours)
lmforge plan --suggest FILE   ... and the smallest tensor × pipeline parallel mesh that fits the GPUs
lmforge plan --gpu-hours H    compute-optimal parameters and tokens for a budget (Chinchilla)
    [--law FILE]              plan with a scaling law fitted by `python -m lmforge_jobs.scaling fit`
lmforge run PATH...           run a manifest set on this machine, in dependency order (no cluster)
    [--s3-endpoint URL]       an S3-compatible store for s3:// URIs (MinIO, Ceph, R2)
lmforge status [--workdir]    the resources of a local run, like `kubectl get lmforge`
lmforge report [--workdir]    (re)write the HTML report of a local run
lmforge arena serve --results OUT [--db URL]   a voting page on an Evaluation's answer pairs
lmforge arena export --results OUT [--db URL]  the human votes as JSONL
lmforge operator [--namespace NS ...|--all-namespaces]   run the Kubernetes operator (kopf)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_REFUSED = 64  # what the operator would refuse: the jobs' configuration-error code (EX_USAGE)


def _validate(args: argparse.Namespace) -> int:
    from lmforge_jobs.manifest import load_resources

    resources, problems = load_resources(args.paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(
            f"{len(problems)} problem(s) in {len({p.source for p in problems})} document(s)", file=sys.stderr
        )
        return EXIT_INVALID
    if not resources:
        print("no lmforge resources found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_INVALID
    # What the operator refuses when it builds the Jobs, found by the same builders, with the chart's
    # podTemplate settings given as options.
    from lmforge_operator import builders
    from lmforge_operator.controller.config import Config

    defaults: dict[str, Any] = {}
    if args.pod_template_defaults:
        import yaml

        defaults = yaml.safe_load(Path(args.pod_template_defaults).read_text(encoding="utf-8")) or {}
    try:
        templates = Config(
            pod_template_defaults=defaults, pod_template_allow_privileged=args.allow_privileged
        ).template_defaults()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    refused = 0
    for resource in resources:
        found = builders.refusals(
            resource,
            template_defaults=templates.get(resource.kind),
            allow_privileged=args.allow_privileged,
        )
        for exc in found:
            print(f"error: spec.{exc.field}: {exc.message} ({resource.ref})", file=sys.stderr)
        refused += bool(found)
        if not found:
            print(f"ok  {resource.ref}")
    if refused:
        print(f"{refused} resource(s) the operator would refuse", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _crds(args: argparse.Namespace) -> int:
    from lmforge_operator.crds import crd_files, write_crds

    out = Path(args.out)
    if args.check:
        stale = []
        expected = crd_files()
        for name, text in expected.items():
            path = out / name
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        extra = (
            sorted(p.name for p in out.glob("*.lmforge.io.yaml") if p.name not in expected)
            if out.is_dir()
            else []
        )
        for name in stale + extra:
            print(
                f"{out / name}: differs from `lmforge crds` output; run `lmforge crds --out {out}`",
                file=sys.stderr,
            )
        return EXIT_INVALID if stale or extra else EXIT_OK
    for path in write_crds(out):
        print(f"wrote {path}")
    return EXIT_OK


def _plan(args: argparse.Namespace) -> int:
    import json

    from lmforge_jobs import plan as planner

    law = None
    if args.law is not None:
        if args.method is not None:
            print("give either --law or --method, not both", file=sys.stderr)
            return EXIT_USAGE
        try:
            law = planner.load_law(args.law)
        except ValueError as exc:
            print(f"--law: {exc}", file=sys.stderr)
            return EXIT_INVALID
    method = args.method or "hoffmann"
    if args.gpu_hours is not None:
        if args.paths:
            print("give either manifest files or --gpu-hours, not both", file=sys.stderr)
            return EXIT_USAGE
        dev = planner.device(args.gpu)
        flops = args.gpu_hours * 3600 * dev.peak_tflops * 1e12 * args.mfu
        opt = planner.chinchilla_optimal(flops, method) if law is None else planner.law_optimal(flops, law)
        law_text = planner.law_label(law) if law is not None or method == "hoffmann" else None
        shape = planner.nearest_shape(opt.parameters, vocab_size=args.vocab or planner.DEFAULT_VOCAB)
        count = planner.count_parameters(shape)
        if args.json:
            print(
                json.dumps(
                    {
                        "gpuHours": args.gpu_hours,
                        "gpu": args.gpu,
                        "mfu": args.mfu,
                        "flops": flops,
                        "method": method if law is None else None,
                        "law": law_text,
                        "parameters": opt.parameters,
                        "tokens": opt.tokens,
                        "loss": opt.loss if opt.loss == opt.loss else None,  # NaN: the law has no loss
                        "shape": shape.to_yaml_dict(),
                        "shapeParameters": count.total,
                    },
                    indent=2,
                )
            )
            return EXIT_OK
        print(
            f"budget      {args.gpu_hours:,.0f} GPU-hours on {dev.name} at MFU {args.mfu:.0%} = {flops:.3e} FLOPs"
        )
        if law is None:
            print(f"method      {planner.METHODS[method]}")
        if law_text:
            print(f"law         {law_text}")
        print(f"parameters  {opt.parameters:.4g}")
        print(f"tokens      {opt.tokens:.4g} ({opt.tokens_per_parameter:.1f} per parameter)")
        if opt.loss == opt.loss:
            print(f"loss        {opt.loss:.3f} (predicted)")
        print(
            f"shape       layers {shape.layers}, hidden {shape.hidden}, heads {shape.heads}, "
            f"kvHeads {shape.n_kv_heads}, ffnHidden {shape.ffn_size}: {count.total:,} parameters"
        )
        return EXIT_OK

    if not args.paths:
        print("give PretrainRun manifest files, or --gpu-hours", file=sys.stderr)
        return EXIT_USAGE
    from lmforge_jobs.manifest import load_resources
    from lmforge_jobs.pretrain.config import PretrainRunSpec

    resources, problems = load_resources(args.paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_INVALID
    runs = [r for r in resources if isinstance(r.spec, PretrainRunSpec)]
    if not runs:
        print("no PretrainRun found in " + " ".join(args.paths), file=sys.stderr)
        return EXIT_INVALID
    out = {}
    try:
        for run in runs:
            out[run.ref] = planner.plan_pretrain(
                run.spec,
                vocab_size=args.vocab,
                gpu=args.gpu,
                mfu=args.mfu,
                price_per_gpu_hour=args.price,
                law=law,
            )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    suggested = {}
    if args.suggest:
        for run in runs:
            found = planner.suggest_mesh(run.spec, vocab_size=args.vocab, gpu=args.gpu, mfu=args.mfu)
            suggested[run.ref] = (
                None if found is None else {**found[0], "memoryPerGpuGiB": found[1].memory_per_gpu_gib}
            )
    if args.json:
        doc = {ref: p.to_dict() for ref, p in out.items()}
        for ref, mesh in suggested.items():
            doc[ref]["suggestedMesh"] = mesh
        print(json.dumps(doc, indent=2))
    else:
        texts = []
        for ref, p in out.items():
            text = f"{ref}\n{planner.explain(p)}"
            if ref in suggested:
                mesh = suggested[ref]
                text += "\n" + (
                    f"suggested mesh: strategy fsdp, tensorParallel {mesh['tensorParallel']}, pipelineParallel "
                    f"{mesh['pipelineParallel']}, activationCheckpointing {bool(mesh['activationCheckpointing'])}"
                    f" (~{mesh['memoryPerGpuGiB']:.1f} GiB per GPU)"
                    if mesh
                    else "suggested mesh: none fits these GPUs; add nodes or GPUs per node"
                )
            texts.append(text)
        print("\n\n".join(texts))
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from lmforge_operator.local import EXIT_INTERRUPTED, LocalRunner, RunError, load_set, order
    from lmforge_operator.progress import Display, RunMetrics

    workdir = Path(args.workdir)
    if args.s3_endpoint is not None:
        from lmforge_jobs.spec import check_endpoint

        try:
            check_endpoint(args.s3_endpoint)
        except ValueError as exc:
            print(f"--s3-endpoint: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        resources = load_set(args.paths)
        order(resources, workdir)  # a cycle or a dangling reference stops everything before it starts
    except RunError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print("nothing was run", file=sys.stderr)
        return EXIT_INVALID
    display = Display(rich=None if not args.plain else False)
    metrics = None
    if args.metrics_port >= 0:
        try:
            metrics = RunMetrics(args.metrics_port)
            display.print(f"metrics: http://127.0.0.1:{metrics.port}/metrics")
        except OSError as exc:
            display.print(f"metrics endpoint not started: {exc}")
    runner = LocalRunner(
        workdir=workdir,
        display=display,
        metrics=metrics,
        s3_endpoint=args.s3_endpoint,
        parallel=args.parallel,
    )
    try:
        outcomes = runner.run(resources)
    finally:
        display.close()
        if metrics is not None:
            metrics.close()
    _print_rows(workdir)
    if not args.no_report:
        from lmforge_operator.report import build_report

        print(f"report: {build_report(workdir)}")
    if runner.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if all(o.phase == "Succeeded" for o in outcomes) else EXIT_INVALID


def _positive(text: str) -> int:
    """An argparse type: a whole number from 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1")
    return value


def _print_rows(workdir: Path) -> None:
    from lmforge_operator.local.view import status_rows

    rows = status_rows(workdir)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _status(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    if not any(workdir.glob("*/*/status.json")):
        print(f"no runs in {workdir}", file=sys.stderr)
        return EXIT_INVALID
    _print_rows(workdir)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from lmforge_operator.report import build_report

    workdir = Path(args.workdir)
    if not any(workdir.glob("*/*/status.json")):
        print(f"no runs in {workdir}", file=sys.stderr)
        return EXIT_INVALID
    print(build_report(workdir))
    return EXIT_OK


def _arena(args: argparse.Namespace) -> int:
    from lmforge_jobs.evaluate import human  # starlette, SQLAlchemy: the arena extra

    try:
        if args.action == "serve":
            human.serve(args.results, args.db, args.host, args.port, rate_limit=args.rate_limit)
            return EXIT_OK
        store = human.VoteStore(args.db or human.default_db(args.results))
        try:
            if args.out == "-":
                n = human.export_jsonl(store, sys.stdout)
            else:
                with open(args.out, "w", encoding="utf-8") as out:
                    n = human.export_jsonl(store, out)
        finally:
            store.close()
    except (FileNotFoundError, ValueError) as exc:
        print(f"arena: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"exported {n} votes", file=sys.stderr)
    return EXIT_OK


def _operator(args: argparse.Namespace) -> int:
    """Run the kopf operator in this process until SIGINT/SIGTERM."""
    if args.all_namespaces and args.namespace:
        print("give either --namespace or --all-namespaces, not both", file=sys.stderr)
        return EXIT_USAGE
    import logging

    import kopf

    from lmforge_operator import handlers

    handlers.Options.metrics_port = args.metrics_port
    kopf.configure(verbose=args.verbose, debug=args.debug, log_format=kopf.LogFormat.FULL)
    logging.getLogger("lmforge").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if not (args.verbose or args.debug):  # kopf logs every watch event it hands over at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = list(args.namespace or [])
    if not namespaces and not args.all_namespaces:
        namespaces = [_own_namespace()]
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port >= 0 else None
    kopf.run(
        standalone=True,
        clusterwide=bool(args.all_namespaces),
        namespaces=namespaces,
        liveness_endpoint=liveness,
    )
    return EXIT_OK


def _own_namespace() -> str:
    """$LMFORGE_NAMESPACE, else the pod's namespace (service account), else "default"."""
    env = os.environ.get("LMFORGE_NAMESPACE") or os.environ.get("POD_NAMESPACE")
    if env:
        return env
    try:
        path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return path.read_text().strip() or "default"
    except OSError:
        return "default"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="Build language models from Kubernetes manifests."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate lmforge manifests (files or directories)")
    p.add_argument("paths", nargs="+", help="YAML files or directories (searched recursively)")
    p.add_argument(
        "--allow-privileged",
        action="store_true",
        help="as the chart's podTemplate.allowPrivileged: pod templates may weaken Pod Security",
    )
    p.add_argument(
        "--pod-template-defaults",
        metavar="FILE",
        help="YAML of the chart's podTemplate.defaults ({Kind: template}), merged under each spec.template",
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser("crds", help="write the CustomResourceDefinitions")
    p.add_argument("--out", default="crds", help="output directory (default: crds)")
    p.add_argument("--check", action="store_true", help="only check that --out is up to date")
    p.set_defaults(func=_crds)

    p = sub.add_parser("plan", help="compute plan of PretrainRuns, or compute-optimal size for a budget")
    p.add_argument("paths", nargs="*", help="YAML files or directories with PretrainRuns")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100", "l40s"], help="GPU type")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--price", type=float, default=None, help="price per GPU-hour, for the cost")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer size when vocabSize is auto")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--suggest", action="store_true", help="also the smallest tensor × pipeline parallel mesh that fits"
    )
    p.add_argument("--gpu-hours", type=float, default=None, help="compute budget in GPU-hours")
    p.add_argument(
        "--method",
        default=None,
        choices=["hoffmann", "hoffmann-approach3", "epoch"],
        help="published scaling-law fit for --gpu-hours (default hoffmann)",
    )
    p.add_argument(
        "--law",
        metavar="FILE",
        default=None,
        help="a fitted scaling law (JSON from `python -m lmforge_jobs.scaling fit` or `lmforge run` of a ScalingStudy, "
        "or a ScalingStudy from `kubectl get scalingstudy NAME -o json`) instead of the published "
        "constants: it sizes --gpu-hours budgets and sets the tokens of tokensPerParameter budgets",
    )
    p.set_defaults(func=_plan)

    p = sub.add_parser("run", help="run manifests on this machine in dependency order (no cluster needed)")
    p.add_argument("paths", nargs="+", help="YAML files or directories (searched recursively)")
    p.add_argument("--workdir", default="lmforge-runs", help="where runs, statuses and the report go")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="Prometheus port on 127.0.0.1 (0 = any free port, -1 = none)",
    )
    p.add_argument("--plain", action="store_true", help="plain progress lines instead of progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        default=None,
        help="S3-compatible store (MinIO, Ceph, R2) for every s3:// URI, before spec.storage.endpoint and "
        "$LMFORGE_S3_ENDPOINT/$AWS_ENDPOINT_URL; credentials come from the environment (AWS_*, AWS_PROFILE)",
    )
    p.add_argument(
        "--parallel",
        type=_positive,
        metavar="N",
        default=None,
        help="a Sweep's trials or a ScalingStudy's points at once, at most (and at most spec.maxParallel); "
        "default: one per free set of GPUs, one at a time on CPU",
    )
    p.set_defaults(func=_run)

    p = sub.add_parser("status", help="show the resources of a local run (like kubectl get lmforge)")
    p.add_argument("--workdir", default="lmforge-runs", help="work directory of `lmforge run`")
    p.set_defaults(func=_status)

    p = sub.add_parser("report", help="write the HTML report of a local run")
    p.add_argument("--workdir", default="lmforge-runs", help="work directory of `lmforge run`")
    p.set_defaults(func=_report)

    p = sub.add_parser("arena", help="human evaluation: a voting page on an Evaluation's answer pairs")
    actions = p.add_subparsers(dest="action", required=True)
    for action, text in (("serve", "serve the voting page"), ("export", "write the votes as JSONL")):
        a = actions.add_parser(action, help=text)
        a.add_argument(
            "--results",
            required=True,
            help="an Evaluation's output directory (or a run's work directory) with judgments*.jsonl, or one file",
        )
        a.add_argument(
            "--db",
            default=None,
            help="SQLAlchemy URL of the votes (default: $LMFORGE_ARENA_DB, else human-votes.sqlite beside the "
            "results)",
        )
        if action == "serve":
            a.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
            a.add_argument("--port", type=int, default=8000, help="port (default 8000)")
            a.add_argument(
                "--rate-limit", type=int, default=30, help="votes per voter per minute (default 30)"
            )
        else:
            a.add_argument("--out", default="-", help="JSONL file (default: standard output)")
    p.set_defaults(func=_arena)

    p = sub.add_parser("operator", help="run the Kubernetes operator that reconciles lmforge resources")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        metavar="NS",
        # kopf expands patterns (team-*) only by listing namespaces, which its scanning (off here, see
        # rbac.py) would do: with scanning off it silently drops every name with * ? ! or ,
        help="namespace to watch, an exact name (repeatable; default: the pod's own namespace)",
    )
    p.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--metrics-port", type=int, default=8080, help="operator metrics port (-1 = none)")
    p.add_argument("--liveness-port", type=int, default=8081, help="/healthz port (-1 = none)")
    p.add_argument("--verbose", "-v", action="store_true", help="more logging")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.set_defaults(func=_operator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # a bug of ours: one line for the user, the traceback only on request
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(
            f"lmforge: internal error: {type(exc).__name__}: {exc} (set LMFORGE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
