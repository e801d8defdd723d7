"""SMC / Feynman-Kac steering (Singhal et al. 2025; DAS, Kim et al. 2025): a population of N particles per batch
item follows a stochastic base step; at scheduled steps each particle's x0-prediction is scored, potentials
reweight the population and it is resampled when the effective sample size drops.  Every potential ends with
a correction so that the product of potentials along a lineage is exp(lam * r(x0)): the weighted population
targets p(x0) exp(lam r(x0)) whatever the potential, tempering or proposal.

The potentials at a scored step t, over the rewards r_s the lineage of a particle was scored with so far (FK
steering's definitions; the sampler runs from high noise to low, so "so far" is s >= t in the paper's time):
    difference  exp(lam (r_t - r_prev))     max  exp(lam max_{s>=t} r_s)
    immediate   exp(lam r_t)                sum  exp(lam sum_{s>=t} r_s)
The running max and sum belong to the lineage and move with it through resampling.

Each batch item resamples, and draws its output particle, with its own generator (samplers/resampling.py), so a
batch item's result depends only on its seed and its own inputs.  The base step's noise comes from one generator
for the whole population, drawn in the same amount at every step whatever the items do.

Gradient-guided proposals (DAS) shift the step's mean by std^2 * lam_t * grad_x r(D(x)) (times alpha/alpha'
for flow models, whose states are scaled by alpha = 1 - sigma) and carry the base/proposal density ratio in the
weights, so the target is unchanged.

Particles are laid out particle-major, [N * B] = x.repeat(N, ...), like Demon's candidates, so ComfyUI's tiling
of batch-B conditioning keeps every particle aligned with its item's prompt.
"""
from __future__ import annotations


import torch
from tqdm.auto import trange

from .model_calls import ComputeCounter, allow_gradients_through, base_model_of, denoise, items_per_call
from .resampling import (RESAMPLERS, effective_sample_size, item_generators, normalise_log_weights,
                         resample_indices, weighted_draw)
from .scoring import SteeringInputError, check_scorer, finite_or_flat, require_choice
from . import live
from .sde import fresh_fraction_eta, noise_generator, noise_scale_of, step_mean_std, uses_flow

POTENTIALS = ("difference", "max", "sum", "immediate")
TEMPERING = ("none", "exponential", "linear")
OUTPUTS = ("weighted_draw", "best", "all")


def reward_steps(steps: int, start: int = 0, end: int = -1, interval: int = 1) -> list[bool]:
    """Steps at which particles are scored: start, start+interval, ... up to end (inclusive; -1 = last), plus the
    last step (the final potential), always."""
    last = steps - 1
    end = last if end < 0 else end
    if interval < 1:
        raise SteeringInputError(f"the reward interval must be at least 1, got {interval}")
    if not 0 <= start <= last or end < start:
        raise SteeringInputError(f"the reward schedule (start {start}, end {end}) lies outside the {steps} steps "
                                 f"(valid steps: 0..{last}, start <= end)")
    chosen = [False] * steps
    for i in range(start, min(end, last) + 1, interval):
        chosen[i] = True
    chosen[last] = True
    return chosen


def lambda_schedule(lam: float, steps: int, tempering: str = "none", gamma: float = 0.008) -> list[float]:
    """lam_i for i = 0..steps-1; the last is always lam.  exponential: lam * min((1+gamma)^(i+1) - 1, 1) (DAS);
    linear: lam * (i+1) / steps."""
    if tempering == "none":
        out = [lam] * steps
    elif tempering == "exponential":
        out = [lam * min((1.0 + gamma) ** (i + 1) - 1.0, 1.0) for i in range(steps)]
    elif tempering == "linear":
        out = [lam * (i + 1) / steps for i in range(steps)]
    else:
        raise SteeringInputError(f"tempering must be one of {TEMPERING}, got {tempering!r}")
    out[-1] = lam
    return out


class Population:
    """Per-particle state carried through resampling, all [B, N]: log weights since the last resampling, the sum of
    the log potentials applied along each lineage, and the lineage's reward summaries: prev_term (difference:
    lam_t r at its previous scoring), running_max / running_sum (max / sum of every reward it was scored with) and
    last_reward (its latest reward; output 'best')."""
    LINEAGE = ("applied", "prev_term", "running_max", "running_sum", "last_reward")

    def __init__(self, batch: int, particles: int, device):
        z = torch.zeros(batch, particles, dtype=torch.float64, device=device)
        self.log_w, self.applied, self.prev_term, self.running_sum, self.last_reward = (z.clone() for _ in range(5))
        self.running_max = torch.full_like(z, -float("inf"))   # no reward yet

    def log_potential(self, kind: str, lam_t: float, r: torch.Tensor, final: bool, lam: float,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
        """log G for rewards r [B, N] at a scored step, and the lineage summaries updated with r.  Items where
        valid [B] is False (their reward failed) get log G = 0 and keep their summaries."""
        valid = torch.ones(r.shape[0], dtype=torch.bool) if valid is None else valid
        keep = valid.to(r.device)[:, None]
        running_max = torch.where(keep, torch.maximum(self.running_max, r), self.running_max)
        running_sum = torch.where(keep, self.running_sum + r, self.running_sum)
        if final:  # whatever came before, the lineage's product of potentials becomes exp(lam * r(x0))
            g = lam * r - self.applied
        elif kind == "difference":
            g = lam_t * r - self.prev_term
            self.prev_term = torch.where(keep, lam_t * r, self.prev_term)
        elif kind == "max":
            g = lam_t * running_max
        elif kind == "sum":
            g = lam_t * running_sum
        elif kind == "immediate":
            g = lam_t * r
        else:
            raise SteeringInputError(f"potential must be one of {POTENTIALS}, got {kind!r}")
        self.running_max, self.running_sum = running_max, running_sum
        self.last_reward = torch.where(keep, r, self.last_reward)
        return torch.where(keep, g, torch.zeros_like(g))

    def reindex(self, idx: torch.Tensor) -> None:
        """Particle p of item b becomes a copy of particle idx[b, p]: its lineage's state comes with it."""
        for name in self.LINEAGE:
            setattr(self, name, torch.gather(getattr(self, name), 1, idx.to(self.applied.device)))
        self.log_w = torch.zeros_like(self.log_w)


def flat_ancestors(idx: torch.Tensor) -> torch.Tensor:
    """[B, N] ancestor indices -> gather indices into the particle-major [N * B] layout."""
    b, n = idx.shape
    return (idx.T * b + torch.arange(b)[None, :]).reshape(-1)


def guided_shift(model, x, sigma, extra_args, batch, chunk, counter, grad_score_fn, lam_t: float, std):
    """(D(x), r(D(x)), std^2 * lam_t * grad_x r(D(x))) with gradients through the model, VAE and reward, in
    chunks; outside ComfyUI's inference mode."""
    allow_gradients_through(base_model_of(model).diffusion_model)
    d_all, r_all, g_all = torch.empty_like(x), torch.empty(x.shape[0], device=x.device), torch.empty_like(x)
    s_all = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        stop = min(x.shape[0], start + chunk)
        with torch.inference_mode(False), torch.enable_grad():
            xi = x[start:stop].detach().clone().requires_grad_(True)
            try:
                d = denoise(model, xi, s_all[start:stop].clone(), dict(extra_args), batch, stop - start, counter)
                r = grad_score_fn(model, d, batch, counter)
                (g,) = torch.autograd.grad(r.sum(), xi)
            except RuntimeError as e:
                if "nference tensor" in str(e):
                    raise SteeringInputError(
                        "gradient guidance could not backpropagate through this model or reward (some of their "
                        f"tensors were created in inference mode: {e}); run SMC without gradient guidance") from None
                raise
        d_all[start:stop], r_all[start:stop], g_all[start:stop] = d.detach(), r.detach().to(x.device), g.detach()
    std = std.to(x.device)
    return d_all, r_all, (std ** 2).to(x.dtype) * lam_t * g_all


@torch.no_grad()
def sample_smc(model, x, sigmas, extra_args=None, callback=None, disable=None, *, score_fn, particles: int = 4,
               lam: float = 10.0, potential: str = "difference", tempering: str = "none", gamma: float = 0.008,
               resampling: str = "multinomial", ess_threshold: float = 0.5, start: int = 0, end: int = -1,
               interval: int = 1, eta: float = 1.0, grad_score_fn=None, output: str = "weighted_draw",
               chunk_items: int = 0, report=None):
    """A ComfyUI sampler function.  score_fn / grad_score_fn from samplers/scoring.make_latent_scorer (the latter
    with differentiable=True, or None for no gradient guidance)."""
    if particles < 1:
        raise SteeringInputError(f"particles must be at least 1, got {particles}")
    require_choice("potential", potential, POTENTIALS)
    require_choice("resampling", resampling, RESAMPLERS)
    require_choice("output", output, OUTPUTS)
    for scorer in (score_fn, grad_score_fn):   # a VAE or reward that cannot score these latents: refused now
        check_scorer(scorer, model, x)
    extra_args = {} if extra_args is None else extra_args
    steps = len(sigmas) - 1
    scheduled = reward_steps(steps, start, end, interval)
    lams = lambda_schedule(lam, steps, tempering, gamma)
    batch, n = x.shape[0], particles
    flow = uses_flow(model)
    noise_scale = noise_scale_of(model)
    counter = ComputeCounter(batch=batch)
    chunk = items_per_call(model, x.shape[1:], batch, chunk_items)
    generator = noise_generator(extra_args)
    resample_generators = item_generators(int(extra_args.get("seed", 0)), batch)
    rep = (n,) + (1,) * (x.ndim - 1)
    xs = x.repeat(*rep)
    pop = Population(batch, n, torch.device("cpu"))
    if report is not None:   # one call per particle and step (gradient guidance adds backward passes)
        report({"plan": True, "model_calls_per_image": steps * n, "steps": steps})
    trace = []
    for i in trange(steps, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        final = i == steps - 1
        fresh = fresh_fraction_eta(sigma, sigma_next, eta, flow, xs)
        guided = grad_score_fn is not None and not final and lams[i] != 0
        if guided:
            _, std = step_mean_std(xs, xs, sigma, sigma_next, fresh, flow, noise_scale=noise_scale)
            std = std.expand(xs.shape[0], *std.shape[1:]) if std.shape[0] == 1 else std
            # The gradient is taken at x but applied to x'.  Flow states are scaled by alpha = 1 - sigma, so a
            # gradient in x' is alpha/alpha' times one in x (1 for eps / v models).
            scale = (1.0 - sigma) / (1.0 - sigma_next) if flow else 1.0
            denoised, r_guided, shift = guided_shift(model, xs, sigma, extra_args, batch, chunk, counter,
                                                     grad_score_fn, lams[i] * scale, std)
        else:
            denoised = denoise(model, xs, sigma, extra_args, batch, chunk, counter)
        stats = {"step": i, "sigma": sigma, "lambda": lams[i] if not final else lam}
        if scheduled[i]:
            r = (r_guided.cpu() if guided else score_fn(model, denoised, batch, counter, step=(i, steps))).double()
            r, ok = finite_or_flat(r.reshape(n, batch), "the reward")
            r = r.T.contiguous()                                   # [B, N]
            g = pop.log_potential(potential, lams[i], r, final, lam, valid=ok)   # NaN rewards: no reweighting
            pop.log_w = pop.log_w + g
            pop.applied = pop.applied + g
            stats.update({"reward_mean": r.mean(1).tolist(), "reward_max": r.max(1).values.tolist()})
        # the base (or guided) stochastic step
        mean, std = step_mean_std(xs, denoised, sigma, sigma_next, fresh, flow, noise_scale=noise_scale)
        noise = torch.randn(xs.shape, generator=generator, dtype=torch.float32).to(xs).double()
        if guided:
            delta = shift.double()
            var = (std.double() ** 2).clamp_min(1e-30)
            # log p_base(x'|x) - log q(x'|x) for x' = mean + delta + std z
            corr = -((2.0 * (delta * std.double() * noise) + delta ** 2) / (2.0 * var)).flatten(1).sum(1)
            pop.log_w = pop.log_w + corr.reshape(n, batch).T.cpu()
            xs = (mean + delta + std * noise).to(xs.dtype)
        else:
            xs = (mean + std * noise).to(xs.dtype)
        ess = effective_sample_size(pop.log_w)
        log_w_before = pop.log_w.clone()   # the weights the particles had when scored (the live view shows them)
        stats["ess"] = ess.tolist()
        resampled = torch.zeros(batch, dtype=torch.bool)
        if scheduled[i] and not final:
            resampled = ess < ess_threshold * n if ess_threshold < 1.0 else torch.ones(batch, dtype=torch.bool)
            if bool(resampled.any()):
                # items above the threshold keep their particles (and their weights, below)
                idx = resample_indices(pop.log_w, resampling, resample_generators, rows=resampled)
                log_w_kept = pop.log_w.clone()
                pop.reindex(idx)
                pop.log_w = torch.where(resampled[:, None], pop.log_w, log_w_kept)
                xs = xs[flat_ancestors(idx).to(xs.device)]
        stats["resampled"] = resampled.tolist()
        if scheduled[i]:
            live.publish(model, denoised, r.T, torch.softmax(log_w_before, dim=1).T, resampled[None, :].expand(n, -1),
                         kind="smc", step=i, steps=steps, mark_name="resampled")
        trace.append(stats)
        if report is not None:
            report(stats)
        if callback is not None:
            callback({"x": xs[:batch], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised[:batch]})
    log_w = normalise_log_weights(pop.log_w, "final particle weights")
    final_ess = effective_sample_size(log_w)
    if output == "all":
        result = xs.reshape(n, batch, *xs.shape[1:]).transpose(0, 1).reshape(n * batch, *xs.shape[1:])
    else:
        if output == "best":
            pick = pop.last_reward.argmax(dim=1)
        else:
            pick = weighted_draw(log_w, resample_generators)
        result = xs[(pick * batch + torch.arange(batch)).to(xs.device)]
    if report is not None:
        report({"done": True, "trace": trace, "particles": n, "final_ess": final_ess.tolist(),
                "final_weights": torch.exp(log_w).tolist(), "final_rewards": pop.last_reward.tolist(),
                **counter.per_image()})
    return result
