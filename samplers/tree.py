"""Diffusion Tree Sampling (DTS) and its greedy variant DTS* (Jain et al. 2025): the denoising chain as a tree.

Tree levels are the schedule's steps: level i holds states at sigmas[i] (level 0 is the root, the starting noise;
the last level, T-1, holds states whose final step lands on their clean image D(x, sigma_{T-1})).  Every node
keeps its state x and its denoiser output D(x) (one model call), so a new child of any node is one stochastic step
(samplers/sde.py, the ancestral fresh-noise fraction eta) away and costs no model call; its rollout to the last
level costs one call per level and adds every state it passes to the tree.

One rollout:
  select   from the root, expand (add a child) at the first node whose child count is below the progressive-widening
           limit max(1, ceil(widening * visits^alpha)); otherwise move to a child: DTS draws it with probability
           proportional to exp(v(c)) (v = lambda * soft value), DTS* takes argmax of its best reward plus a UCT
           bonus.  A path that reaches the last level without expanding only counts a visit and starts again.
  rollout  stochastic steps from the new child down to the last level; the leaf's reward r = reward(D(x_leaf)).
  backup   DTS: v(node) = log mean_{children c} exp(v(c)), leaves v = lambda * r (the soft Bellman backup: children
           are draws from p(x_{i+1} | x_i), so the mean over them estimates E[exp(lambda r(x_0)) | x_i]);
           DTS*: v(node) = max over children, leaves v = r.
Output: DTS descends once more, drawing children by exp(v(c)) -- a draw whose law tends to p(x_0) exp(lambda r)
as the tree grows (progressive widening lets every node's children grow without bound); DTS* returns the leaf
with the best reward.  Both are anytime: stopped early (model calls, seconds or rollouts per image) they return
the current tree's draw / the best leaf so far.

Each rollout draws its selection and step noises from its own generator, seeded from (seed, item, rollout index)
(samplers/resampling.item_seed), so a batch item's result depends only on its own inputs, and a larger budget
replays a smaller one's rollouts exactly before adding its own (DTS*'s best reward never decreases with budget).
Batch items run in lockstep: each model call holds the active paths of every item, laid out candidate-major
(slot j of item b at j*B + b) so ComfyUI's conditioning tiling, inpainting masks and img2img line up.
"""
from __future__ import annotations

import logging
import math
import time

import torch
import comfy.model_management

from .model_calls import ComputeCounter, denoise, items_per_call
from .resampling import item_seed
from .scoring import SteeringInputError, check_scorer, finite_or_flat, require_choice
from . import live
from .sde import fresh_fraction_eta, noise_scale_of, stochastic_step, uses_flow

MODES = ("dts", "dts_star")


class ItemTree:
    """One batch item's tree: parallel lists indexed by node id (0 = root).  value is None while a node's first
    rollout is in flight; a dropped node (an abandoned rollout) has level -1 and no parent link."""

    def __init__(self, x_root: torch.Tensor):
        self.parent, self.level, self.children = [-1], [0], [[]]
        self.visits, self.value, self.reward = [0], [None], [None]
        self.x, self.denoised = [x_root], [None]
        self.reward_min, self.reward_max = math.inf, -math.inf
        self.best = -1   # the leaf with the highest reward so far

    def reward_range(self) -> float:
        """Spread of the rewards seen so far (1 until two differ): scales DTS*'s exploration bonus."""
        spread = self.reward_max - self.reward_min
        return spread if math.isfinite(spread) and spread > 0 else 1.0

    def __len__(self):
        return sum(1 for lv in self.level if lv >= 0)

    def add_child(self, node: int) -> int:
        self.parent.append(node)
        self.level.append(self.level[node] + 1)
        self.children.append([])
        self.visits.append(0)
        self.value.append(None)
        self.reward.append(None)
        self.x.append(None)
        self.denoised.append(None)
        self.children[node].append(len(self.parent) - 1)
        return len(self.parent) - 1

    def drop(self, node: int) -> None:
        """Forget the chain of an abandoned rollout starting at `node` (its descendants are the chain)."""
        parent = self.parent[node]
        if parent >= 0 and node in self.children[parent]:
            self.children[parent].remove(node)
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(self.children[n])
            self.level[n], self.parent[n], self.children[n] = -1, -1, []
            self.x[n] = self.denoised[n] = None

    def ancestors(self, node: int):
        while node >= 0:
            yield node
            node = self.parent[node]

    def leaves(self) -> list[int]:
        return [n for n, r in enumerate(self.reward) if r is not None and self.level[n] >= 0]


def widening_limit(visits: int, widening: float, alpha: float) -> int:
    return max(1, math.ceil(widening * visits ** alpha))


def _draw_by_value(values: list[float], generator: torch.Generator) -> int:
    """An index drawn with probability proportional to exp(values[i]) (one uniform from the generator)."""
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    u = float(torch.rand((), generator=generator, dtype=torch.float64)) * sum(weights)
    for i, w in enumerate(weights):
        u -= w
        if u < 0:
            return i
    return len(weights) - 1


def _child_by_value(tree: "ItemTree", done: list[int], mode: str, exploration: float,
                    generator: torch.Generator) -> int:
    if mode == "dts":
        return done[_draw_by_value([tree.value[c] for c in done], generator)]
    log_visits = math.log(max(1, tree.visits[tree.parent[done[0]]]))
    scale = exploration * tree.reward_range()
    scores = [tree.value[c] + scale * math.sqrt(log_visits / max(1, tree.visits[c])) for c in done]
    return done[scores.index(max(scores))]   # ties: the oldest child


def select(tree: ItemTree, last_level: int, mode: str, widening: float, alpha: float, exploration: float,
           generator: torch.Generator) -> int:
    """Descend from the root and add one pending child where the widening limit allows; returns the new node."""
    for _ in range(100000):
        node = 0
        while True:
            if tree.level[node] == last_level:          # a leaf: count the visit, start again from the root
                for a in tree.ancestors(node):
                    tree.visits[a] += 1
                break
            done = [c for c in tree.children[node] if tree.value[c] is not None]
            if not done or len(tree.children[node]) < widening_limit(tree.visits[node], widening, alpha):
                return tree.add_child(node)
            node = _child_by_value(tree, done, mode, exploration, generator)
    raise RuntimeError("tree selection found nothing to expand")   # unreachable: visits grow every pass


def backup(tree: ItemTree, leaf: int, reward: float, mode: str, lam: float) -> None:
    tree.reward[leaf] = reward
    tree.reward_min, tree.reward_max = min(tree.reward_min, reward), max(tree.reward_max, reward)
    if tree.best < 0 or reward > tree.reward[tree.best]:
        tree.best = leaf
    tree.value[leaf] = lam * reward if mode == "dts" else reward
    for node in tree.ancestors(leaf):
        tree.visits[node] += 1
        if node != leaf:
            values = [tree.value[c] for c in tree.children[node] if tree.value[c] is not None]
            top = max(values)
            tree.value[node] = (top + math.log(sum(math.exp(v - top) for v in values) / len(values))
                                if mode == "dts" else top)


def draw_leaf(tree: ItemTree, last_level: int, generator: torch.Generator) -> int:
    """DTS's output: descend from the root drawing each child with probability proportional to exp(v(c))."""
    node = 0
    while tree.level[node] != last_level:
        done = [c for c in tree.children[node] if tree.value[c] is not None]
        node = done[_draw_by_value([tree.value[c] for c in done], generator)]
    return node


def best_leaf(tree: ItemTree) -> int:
    """The leaf with the highest reward (the first found among equals); -1 before the first rollout."""
    return tree.best


def check_tree_fits(nodes_per_item: int, x: torch.Tensor, batch: int, device) -> None:
    """Refuse a tree whose states (x and D per node) would not fit in free memory, before it runs."""
    item_bytes = x[0].numel() * x.element_size()
    need = nodes_per_item * 2 * item_bytes * batch
    free = comfy.model_management.get_free_memory(device)
    if need > 0.8 * free:
        raise SteeringInputError(
            f"the tree would need up to {need / 2 ** 20:.0f} MiB ({nodes_per_item} nodes per image x 2 latents x "
            f"{batch} images) but only {free / 2 ** 20:.0f} MiB is free: lower rollouts or max_calls, or the batch")


class Clock:
    """Deadline in seconds; `now` is injectable (tests use a fake clock advanced by each model call)."""

    def __init__(self, seconds: float, now=time.monotonic):
        self.now, self.start = now, now()
        self.limit = seconds if seconds > 0 else math.inf

    def elapsed(self) -> float:
        return self.now() - self.start

    def expired(self) -> bool:
        return self.elapsed() >= self.limit


def _layout(paths_by_item: list[list], batch: int) -> list[tuple[int, int]]:
    """(item, index into that item's path list) per slot, candidate-major; (item, -1) pads a short item."""
    slots = max((len(p) for p in paths_by_item), default=0)
    return [(b, j if j < len(paths_by_item[b]) else -1) for j in range(slots) for b in range(batch)]


@torch.no_grad()
def sample_tree(model, x, sigmas, extra_args=None, callback=None, disable=None, *, score_fn, mode: str = "dts",
                lam: float = 10.0, rollouts: int = 16, max_calls: float = 0.0, max_seconds: float = 0.0,
                parallel: int = 1, widening: float = 1.0, alpha: float = 0.5, exploration: float = 1.0,
                eta: float = 1.0, chunk_items: int = 0, report=None, clock=None):
    """A ComfyUI sampler function.  Budgets per image: `rollouts` (always), `max_calls` model calls and
    `max_seconds` (0 = no limit); whichever runs out first ends the search.  `parallel` rollouts per item share
    each model call.  clock: a zero-argument time function (tests); default time.monotonic."""
    require_choice("mode", mode, MODES)
    for name, value in (("lambda", lam), ("max_calls", max_calls), ("max_seconds", max_seconds),
                        ("widening", widening), ("alpha", alpha), ("exploration", exploration), ("eta", eta)):
        if not math.isfinite(float(value)):
            raise SteeringInputError(f"{name} must be a finite number, got {value}")
    if rollouts < 1 or parallel < 1:
        raise SteeringInputError(f"rollouts and parallel must be at least 1, got {rollouts} and {parallel}")
    reward = getattr(score_fn, "reward", score_fn)
    if getattr(reward, "compares_candidates", False) and parallel < 2:
        raise SteeringInputError(
            f"{reward.describe() if hasattr(reward, 'describe') else 'this reward'} compares an item's candidates, "
            f"and the tree asks it once per round about that round's `parallel` rollouts of each item: set parallel "
            f"to at least 2 (got {parallel}); each round then shows that many final images per item")
    if widening <= 0 or not 0 <= alpha <= 1 or not 0 < eta <= 1:
        raise SteeringInputError(f"widening must be > 0, alpha within 0..1 and eta within (0, 1] (eta = 0 makes "
                                 f"every child the same); got {widening}, {alpha}, {eta}")
    steps = len(sigmas) - 1
    if steps < 2 or float(sigmas[-2]) <= 0:
        raise SteeringInputError("tree search needs at least 2 steps ending above sigma = 0 before the last one")
    if 0 < max_calls < steps:
        raise SteeringInputError(f"max_calls ({max_calls:g} model calls per image) is below one rollout: the first "
                                 f"rollout needs {steps} calls ({steps} steps), so set max_calls to at least {steps} "
                                 "(or 0 for no limit)")
    extra_args = {} if extra_args is None else extra_args
    check_scorer(score_fn, model, x)   # a VAE or reward that cannot score these latents: refused before any call
    batch, last = x.shape[0], steps - 1
    flow, noise_scale = uses_flow(model), noise_scale_of(model)
    seed = int(extra_args.get("seed", 0))
    store = torch.device("cpu")
    max_nodes = 1 + min(rollouts * steps, int(max_calls) if max_calls > 0 else rollouts * steps)
    check_tree_fits(max_nodes, x, batch, store)
    counter = ComputeCounter(batch=batch)
    chunk = items_per_call(model, x.shape[1:], batch, chunk_items)
    clock = Clock(max_seconds * batch, clock or time.monotonic)
    sig = [float(s) for s in sigmas]

    def model_call(states: torch.Tensor, levels: list[int]) -> torch.Tensor:
        level_sigmas = torch.tensor([sig[lv] for lv in levels], dtype=x.dtype)
        return denoise(model, states.to(x.device), level_sigmas.to(x.device), extra_args, batch, chunk,
                       counter).to(store)

    if report is not None:   # the root call, then at most one call per rollout step, within max_calls
        report({"plan": True, "model_calls_per_image": min(1 + rollouts * steps, max_calls or math.inf),
                "steps": steps, "at_most": True})
    trees = [ItemTree(x[b].to(store)) for b in range(batch)]
    root_d = model_call(x.to(store), [0] * batch)
    for b, tree in enumerate(trees):
        tree.denoised[0] = root_d[b]
    spent = [1] * batch                  # model calls per item (real ones, not the padding)
    done_rollouts = [0] * batch
    trace, rounds = [], 0
    stopped_by = "rollouts"
    while True:
        active = [b for b in range(batch) if done_rollouts[b] < rollouts and
                  (max_calls <= 0 or spent[b] + 1 <= max_calls)]
        if not active:
            stopped_by = "max_calls" if max_calls > 0 and any(spent[b] + 1 > max_calls for b in range(batch)) \
                else "rollouts"
            break
        if rounds > 0 and clock.expired():
            stopped_by = "max_seconds"
            break
        # select: each rollout has its own generator (seed, item, rollout index)
        paths: list[list[dict]] = [[] for _ in range(batch)]
        for b in active:
            for j in range(min(parallel, rollouts - done_rollouts[b])):
                index = done_rollouts[b] + j
                gen = torch.Generator(device="cpu").manual_seed(item_seed(seed, b, f"tree/{index}"))
                node = select(trees[b], last, mode, widening, alpha, exploration, gen)
                cost = last - trees[b].level[node] + 1
                if max_calls > 0 and spent[b] + sum(p["cost"] for p in paths[b]) + cost > max_calls:
                    trees[b].drop(node)        # would overrun this item's call budget: end of its search
                    break
                paths[b].append({"start": node, "node": node, "gen": gen, "cost": cost})
        if not any(paths):
            stopped_by = "max_calls"
            break
        abandoned = False
        # a new child is one stochastic step from its parent's cached (x, D): no model call
        _advance(trees, paths, sig, flow, noise_scale, eta, x.dtype, store, first=True)
        while any(p["node"] is not None and trees[b].denoised[p["node"]] is None
                  for b in range(batch) for p in paths[b]):
            if rounds > 0 and clock.expired():
                abandoned = True
                break
            layout = _layout([[p for p in paths[b]] for b in range(batch)], batch)
            states, levels = [], []
            for b, j in layout:
                p = paths[b][j] if j >= 0 else None
                node = p["node"] if p is not None and trees[b].denoised[p["node"]] is None else None
                states.append(trees[b].x[node] if node is not None else trees[b].x[0])
                levels.append(trees[b].level[node] if node is not None else 0)
            out = model_call(torch.stack(states), levels)
            for slot, (b, j) in enumerate(layout):
                p = paths[b][j] if j >= 0 else None
                if p is not None and trees[b].denoised[p["node"]] is None:
                    trees[b].denoised[p["node"]] = out[slot]
                    spent[b] += 1
            _advance(trees, paths, sig, flow, noise_scale, eta, x.dtype, store, first=False)
        if abandoned:
            for b in range(batch):
                for p in paths[b]:
                    trees[b].drop(p["start"])
            stopped_by = "max_seconds"
            break
        if rounds > 0 and clock.expired():   # the reward call would start after the deadline
            for b in range(batch):
                for p in paths[b]:
                    trees[b].drop(p["start"])
            stopped_by = "max_seconds"
            break
        _score_and_backup(model, trees, paths, batch, counter, score_fn, mode, lam, steps)
        for b in range(batch):
            done_rollouts[b] += len(paths[b])
        rounds += 1
        stats = _round_stats(trees, paths, done_rollouts, spent, clock, mode, last)
        trace.append(stats)
        if report is not None:
            report(stats)
        if callback is not None:
            fraction = max(d / rollouts for d in done_rollouts)
            best = torch.stack([trees[b].denoised[best_leaf(trees[b])] for b in range(batch)]).to(x)
            callback({"x": best, "i": min(steps - 1, int(fraction * (steps - 1))), "sigma": sigmas[0],
                      "sigma_hat": sigmas[0], "denoised": best})
    if rounds > 0 and clock.limit < math.inf and trace and trace[0]["seconds"] > clock.limit:
        logging.warning("[reward-steering] max_seconds is shorter than one rollout (%.3g s for the batch): "
                        "returned the first rollout", trace[0]["seconds"])
    picks = []
    for b, tree in enumerate(trees):
        if mode == "dts":
            gen = torch.Generator(device="cpu").manual_seed(item_seed(seed, b, "tree/draw"))
            picks.append(draw_leaf(tree, last, gen))
        else:
            picks.append(best_leaf(tree))
    result = torch.stack([trees[b].denoised[n] for b, n in enumerate(picks)]).to(x)
    if report is not None:
        report({"done": True, "trace": trace, "mode": mode, "stopped_by": stopped_by, "rollouts": done_rollouts,
                "model_calls": spent, "tree_nodes": [len(t) for t in trees],
                "output_reward": [trees[b].reward[n] for b, n in enumerate(picks)],
                "best_reward": [trees[b].reward[best_leaf(trees[b])] for b in range(batch)],
                "seconds": clock.elapsed(), **counter.per_image()})
    return result


def _advance(trees, paths, sig, flow, noise_scale, eta, dtype, store, first: bool) -> None:
    """Give every path whose current node has no state yet (first: the new child) or whose node was just
    denoised (not first: step on to a new child) its next state, in one batched stochastic step."""
    moves = []
    for b, item_paths in enumerate(paths):
        tree = trees[b]
        for p in item_paths:
            node = p["node"]
            if first:
                moves.append((b, p, node))
            elif tree.denoised[node] is not None and tree.level[node] < len(sig) - 2:
                p["node"] = tree.add_child(node)
                moves.append((b, p, p["node"]))
    if not moves:
        return
    parents = [trees[b].parent[n] for b, _, n in moves]
    xs = torch.stack([trees[b].x[par] for (b, _, _), par in zip(moves, parents)])
    ds = torch.stack([trees[b].denoised[par] for (b, _, _), par in zip(moves, parents)])
    s = torch.tensor([sig[trees[b].level[par]] for (b, _, _), par in zip(moves, parents)], dtype=torch.float64)
    s_next = torch.tensor([sig[trees[b].level[n]] for b, _, n in moves], dtype=torch.float64)
    noise = torch.stack([torch.randn(xs.shape[1:], generator=p["gen"], dtype=torch.float32) for _, p, _ in moves])
    fresh = fresh_fraction_eta(s, s_next, eta, flow, xs)
    new = stochastic_step(xs, ds, s, s_next, noise.to(xs), fresh, flow, noise_scale).to(dtype)
    for (b, _, n), state in zip(moves, new):
        trees[b].x[n] = state.to(store)


def _round_rewards(model, trees, paths, batch, counter, score_fn, steps) -> dict:
    """{(item, path index): reward} of this round's leaves, in one reward call: the selection point.  Items with
    fewer paths are padded (candidate-major needs equal counts); a reward that compares candidates is never shown
    a pad: when a round has pads it is asked item by item, about that item's own leaves only."""
    layout = _layout(paths, batch)
    step = (steps - 1, steps)
    compares = getattr(getattr(score_fn, "reward", score_fn), "compares_candidates", False)
    if compares and any(j < 0 for _, j in layout):
        rewards = {}
        for b, item_paths in enumerate(paths):
            if item_paths:
                x0 = torch.stack([trees[b].denoised[p["node"]] for p in item_paths])
                values = score_fn(model, x0, 1, counter, step=step).double()
                rewards.update({(b, j): float(v) for j, v in enumerate(values)})
        return rewards
    x0 = torch.stack([trees[b].denoised[paths[b][j]["node"] if j >= 0 else best_or_root(trees[b])]
                      for b, j in layout])
    values = score_fn(model, x0, batch, counter, step=step).double()
    finite_or_flat(values.reshape(-1, batch), "the reward")   # the NaN warning
    table = values.reshape(-1, batch)   # the live view: this round's leaves, the best marked
    live.publish(model, x0, table, torch.full_like(table, 1.0 / table.shape[0]), table == table.max(0).values,
                 kind="tree", step=step[0], steps=steps, mark_name="best")
    return {(b, j): float(v) for (b, j), v in zip(layout, values) if j >= 0}


def _score_and_backup(model, trees, paths, batch, counter, score_fn, mode, lam, steps) -> None:
    rewards = _round_rewards(model, trees, paths, batch, counter, score_fn, steps)
    for (b, j), r in sorted(rewards.items()):
        if not math.isfinite(r):   # no information: the item's mean reward so far (a neutral value)
            known = [v for v in trees[b].reward if v is not None]
            r = sum(known) / len(known) if known else 0.0
        backup(trees[b], paths[b][j]["node"], r, mode, lam)


def best_or_root(tree: ItemTree) -> int:
    return max(tree.best, 0)


def _round_stats(trees, paths, done_rollouts, spent, clock, mode, last) -> dict:
    rewards = [[t.reward[p["node"]] for p in item] for t, item in zip(trees, paths)]
    return {"rollouts": list(done_rollouts), "model_calls": list(spent), "seconds": clock.elapsed(),
            "tree_nodes": [len(t) for t in trees],
            # depth of re-use: the level a rollout branched off the existing tree (0 = a fresh sample)
            "branch_level": [[t.level[t.parent[p["start"]]] for p in item] for t, item in zip(trees, paths)],
            "rollout_reward": rewards,
            "best_reward": [t.reward[t.best] if t.best >= 0 else None for t in trees]}
