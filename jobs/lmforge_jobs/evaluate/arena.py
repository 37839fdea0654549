"""Bradley–Terry ratings from pairwise games, on the Elo scale (as Chatbot Arena reports them).

A game is ``(i, j, s)``: model ``i`` met model ``j`` and scored ``s`` (1 win, 0.5 tie, 0 loss). The
Bradley–Terry model says P(i beats j) = p_i / (p_i + p_j); the strengths are fitted by maximum likelihood
with Hunter's minorization–maximization iteration (ties count half a win for each side). ``prior`` adds
that many virtual games per pair of models, split evenly, so a model that lost every game still gets a
finite rating (0 fits the plain MLE). Ratings are ``1000 + 400 * log10(p_i / geometric mean p)``: the mean
rating is 1000 and a 400-point gap means 10:1 odds. Intervals: 95 % percentile bootstrap over games.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BASE_RATING = 1000.0
SCALE = 400.0

Game = tuple[int, int, float]


def _matrices(
    n: int, games: Sequence[Game], weights: np.ndarray, prior: float
) -> tuple[np.ndarray, np.ndarray]:
    """Win and game counts (B, n, n) for B weightings of the games (bootstrap resamples)."""
    i = np.array([g[0] for g in games], dtype=int)
    j = np.array([g[1] for g in games], dtype=int)
    s = np.array([g[2] for g in games], dtype=float)
    onehot_ij = np.zeros((len(games), n * n))
    onehot_ji = np.zeros((len(games), n * n))
    onehot_ij[np.arange(len(games)), i * n + j] = 1.0
    onehot_ji[np.arange(len(games)), j * n + i] = 1.0
    wins = weights @ (onehot_ij * s[:, None] + onehot_ji * (1.0 - s)[:, None])
    played = weights @ (onehot_ij + onehot_ji)
    wins, played = wins.reshape(-1, n, n), played.reshape(-1, n, n)
    if prior > 0:
        off = 1.0 - np.eye(n)
        wins = wins + off * prior / 2.0
        played = played + off * prior
    return wins, played


def _fit(wins: np.ndarray, played: np.ndarray, iters: int = 5000, tol: float = 1e-10) -> np.ndarray:
    """Minorization–maximization for B problems at once; strengths (B, n) with geometric mean 1."""
    total = wins.sum(axis=2)
    p = np.ones(total.shape)
    for _ in range(iters):
        denom = (played / (p[:, :, None] + p[:, None, :])).sum(axis=2)
        new = np.where(denom > 0, total / np.where(denom > 0, denom, 1.0), p)
        new = np.maximum(new, 1e-300)
        new /= np.exp(np.mean(np.log(new), axis=1, keepdims=True))
        done = np.max(np.abs(np.log(new) - np.log(p))) < tol
        p = new
        if done:
            break
    return p


def strengths(n: int, games: Sequence[Game], prior: float = 0.5) -> np.ndarray:
    """Bradley–Terry strengths p (geometric mean 1) of ``n`` models."""
    if not games:
        return np.ones(n)
    wins, played = _matrices(n, games, np.ones((1, len(games))), prior)
    return _fit(wins, played)[0]


def ratings(n: int, games: Sequence[Game], prior: float = 0.5) -> np.ndarray:
    """Elo-scale ratings (mean 1000) of ``n`` models."""
    return BASE_RATING + SCALE * np.log10(strengths(n, games, prior))


def rate(
    names: Sequence[str],
    games: Sequence[Game],
    *,
    prior: float = 0.5,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float | list[float]]]:
    """``{name: {rating, ci95}}`` (the Results.arena shape) from games between ``names``."""
    n = len(names)
    point = ratings(n, games, prior)
    out: dict[str, dict[str, float | list[float]]] = {
        name: {"rating": float(r)} for name, r in zip(names, point, strict=True)
    }
    if games and bootstrap_samples > 0:
        rng = np.random.default_rng(seed)
        weights = rng.multinomial(len(games), np.full(len(games), 1.0 / len(games)), size=bootstrap_samples)
        wins, played = _matrices(n, games, weights.astype(float), prior)
        samples = BASE_RATING + SCALE * np.log10(_fit(wins, played))
        low, high = np.percentile(samples, [2.5, 97.5], axis=0)
        for k, name in enumerate(names):
            out[name]["ci95"] = [float(low[k]), float(high[k])]
    return out


__all__ = ["BASE_RATING", "SCALE", "rate", "ratings", "strengths"]
