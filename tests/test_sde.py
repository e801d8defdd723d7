"""The shared reverse-SDE step (samplers/sde.py), checked on the exact oracle through ComfyUI's sampling code."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

import harness

PARAMS = ["eps", "v_prediction", "flow"]
WEIGHTS = (1, 2, 3, 4, 4, 3, 2, 1)


def run_sampler(parametrization, sampler, n, steps, seed, scheduler="simple"):
    import comfy.sample
    import comfy.samplers
    cm = harness.pack_submodule("reference.comfy_model")
    patcher = cm.build_reference_model(cm.ReferenceSpec(weights=WEIGHTS, parametrization=parametrization))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)
    latent = torch.zeros(n, 3, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    cond = cm.neutral_conditioning()
    with torch.inference_mode():
        return comfy.sample.sample_custom(patcher, noise, 1.0, sampler, sigmas, cond, cond, latent,
                                          disable_pbar=True, seed=seed)


def sde_sampler(beta):
    import comfy.samplers
    sde = harness.pack_submodule("samplers.sde")
    return comfy.samplers.KSAMPLER(sde.sample_sde, extra_options={"beta": beta})


@pytest.mark.parametrize("parametrization", PARAMS)
def test_beta_zero_is_comfys_euler(parametrization):
    import comfy.samplers
    ours = run_sampler(parametrization, sde_sampler(0.0), 16, 20, seed=3)
    euler = run_sampler(parametrization, comfy.samplers.sampler_object("euler"), 16, 20, seed=3)
    assert torch.allclose(ours, euler, atol=1e-5), (ours - euler).abs().max()


@pytest.mark.parametrize("parametrization", PARAMS)
def test_sde_sampling_keeps_the_mixture_law(parametrization):
    """beta = 0.5 injects a lot of noise; the component frequencies must still be the mixture's."""
    cm = harness.pack_submodule("reference.comfy_model")
    n = 800
    samples = run_sampler(parametrization, sde_sampler(0.5), n, 60, seed=5)
    mix = cm.ReferenceSpec(weights=WEIGHTS, parametrization=parametrization).mixture(8, 8)
    labels = mix.classify(samples)
    resid = (samples - mix.means[labels]).reshape(n, -1).pow(2).mean(1).sqrt()
    assert resid.mean() < 0.2
    counts = torch.bincount(labels, minlength=8).double()
    p = stats.chisquare(counts.numpy(), (mix.weights.double() / mix.weights.double().sum() * n).numpy())[1]
    assert p > 0.01, counts.tolist()


def test_variance_exploding_formula_would_be_wrong_for_flow():
    """On flow models the step must account for alpha = 1 - sigma: the variance-exploding formula gives a
    different step whenever beta > 0 -- the reason the step takes `flow`."""
    sde = harness.pack_submodule("samplers.sde")
    x, d, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    flow = sde.sde_step(x, d, 0.6, 0.5, z, 0.3, flow=True)
    ve = sde.sde_step(x, d, 0.6, 0.5, z, 0.3, flow=False)
    assert not torch.allclose(flow, ve)
    # and with beta = 0 both are the same Euler step of the PF-ODE
    assert torch.allclose(sde.sde_step(x, d, 0.6, 0.5, z, 0.0, True), sde.sde_step(x, d, 0.6, 0.5, z, 0.0, False))


def test_same_seed_same_samples():
    a = run_sampler("flow", sde_sampler(0.3), 4, 10, seed=1)
    b = run_sampler("flow", sde_sampler(0.3), 4, 10, seed=1)
    c = run_sampler("flow", sde_sampler(0.3), 4, 10, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_step_is_the_exact_conditional_law_for_a_point_mass():
    """If the data is a single point x0 (so D = x0 exactly), the step must map the marginal at sigma to the
    marginal at sigma_next: mean alpha' x0 and std sigma', whatever beta and step size."""
    sde = harness.pack_submodule("samplers.sde")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200000, 1), 0.7)
    for flow, (s, s_next) in [(False, (3000.0, 40.0)), (False, (2.0, 0.5)), (True, (0.9, 0.3)), (True, (1.0, 0.6))]:
        a, a_next = (1 - s, 1 - s_next) if flow else (1.0, 1.0)
        x = a * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64).float()
        out = sde.sde_step(x, x0, s, s_next, torch.randn(x0.shape, generator=gen), 0.4, flow).double()
        assert abs(out.mean() - a_next * 0.7) < 5 * s_next / 447 + 1e-6, (flow, s, out.mean())
        assert abs(out.std() / s_next - 1) < 0.01, (flow, s, out.std())
