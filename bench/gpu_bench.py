#!/usr/bin/env python3
"""GPU benchmark of the steering samplers on full-size random-weight models, every ratio taken in one run.

Models are ComfyUI's own classes (comfy.supported_models SDXL / Flux / SD15) at their real unet_config, built on
the device in the model dtype and filled by a seeded fan-in-scaled random init there (no files, no downloads).
Per model family:

  plain      plain Euler sampling at batch 1..16: seconds per model call, per item, items per second, the peak
  steering   Demon (K = 8, 16; Tweedie) and SMC (N = 8), latent-RGB decoder + colour reward: seconds per image,
             overhead = wall / sum over the run's model calls of (items x per-item time of plain sampling at that
             call's batch size), and the share of the peak items/s that the candidate calls reach (goal >= 90 %)
  decode     cost per candidate of the decoders: full VAE, TAESD (both random weights on ComfyUI's VAE code) and
             the latent-RGB preview projection
  memory_cap (SDXL) Demon K = 16 at 1024^2 under a 24 GiB cap: torch.cuda.set_per_process_memory_fraction caps the
             allocator, and a ballast tensor holds everything above the cap so that ComfyUI's free-memory query
             (which the automatic chunking reads) sees a 24 GiB card; the chunk sizes the sampler chose and the
             peak torch.cuda.max_memory_allocated (minus the ballast) are recorded against the cap
and once: rewards, the pack's aesthetic (open_clip ViT-L-14) and CLIP score (ViT-H-14) rewards with random
weights, ms per image scored batched vs one at a time.

Each section is wrapped: a failure (say OOM on Flux) is recorded with its error and the rest still runs.

    COMFYUI_DIR=... python bench/gpu_bench.py                 # full size on the GPU -> bench/results/gpu_bench.*
    python bench/gpu_bench.py --tiny --out /tmp/x.json        # tiny configs of the same classes on the CPU
    python bench/gpu_bench.py --cpu-fullsize                  # full-size SD1.5 UNet, fp32, CPU, 256^2
                                                              #   -> bench/results/cpu_fullsize_sd15.*
A device whose commands are limited to 10 minutes runs it in pieces into one JSON (each piece a few minutes):
    python bench/gpu_bench.py --families sdxl_1024
    python bench/gpu_bench.py --families flux_dev_1024 --merge
    python bench/gpu_bench.py --families none --sections rewards --merge
--tiny is chosen automatically when no CUDA device is present.  ComfyUI is found as by the other bench scripts
(COMFYUI_DIR / COMFYUI_PYTHON, else the newest host in .host/).  The plot (PIL, as the other benches) goes next to
the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

import harness  # noqa: E402
import plotting  # noqa: E402  (bench/plotting.py, beside this file)
from comfy_client import host_paths  # noqa: E402

GIB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny configs of the same classes on the CPU (CI)")
    mode.add_argument("--cpu-fullsize", action="store_true", help="full-size SD1.5 UNet, fp32, on the CPU, 256^2")
    p.add_argument("--out", type=Path, help="JSON path (the plot goes beside it)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds of plain + steering (default 2 on cpu-fullsize, else 1)")
    p.add_argument("--sections", default="", help="comma-separated subset: plain,steering,decode,memory_cap,rewards")
    p.add_argument("--families", default="", help="comma-separated subset of the mode's families, e.g. sdxl_1024")
    p.add_argument("--merge", action="store_true",
                   help="update the sections of an existing --out JSON (a run split over several commands)")
    args = p.parse_args(argv)
    if not args.tiny and not args.cpu_fullsize and not torch.cuda.is_available():
        print("no CUDA device: running --tiny", flush=True)
        args.tiny = True
    args.mode = "tiny" if args.tiny else "cpu-fullsize" if args.cpu_fullsize else "gpu"
    default = {"gpu": "gpu_bench.json", "tiny": "gpu_bench_tiny.json", "cpu-fullsize": "cpu_fullsize_sd15.json"}
    args.out = (args.out or REPO / "bench" / "results" / default[args.mode]).resolve()
    return args


ARGS = parse_args() if __name__ == "__main__" else None


def bootstrap(cpu: bool) -> None:
    """Import ComfyUI in-process.  harness pins `--cpu`; for the GPU, ComfyUI's default arguments are parsed first
    (comfy.cli_args without argument parsing), so its device choice is the GPU."""
    comfy_dir = Path(host_paths()[1]).resolve()
    if not cpu:
        sys.path.insert(0, str(comfy_dir))
        os.chdir(comfy_dir)
        import comfy.cli_args  # noqa: F401
    harness.bootstrap_comfy(comfy_dir)
    logging.disable(logging.WARNING)
    link = comfy_dir / "custom_nodes" / harness.PACK_LINK_NAME
    if not (link / "__init__.py").exists():
        sys.exit(f"the pack is not installed in {comfy_dir}: link it first, e.g. ln -s {REPO} {link}")


bootstrap(cpu=ARGS is None or ARGS.mode != "gpu")

import comfy.ldm.models.autoencoder  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.taesd.taesd  # noqa: E402

demon = harness.pack_submodule("samplers.demon")
smc = harness.pack_submodule("samplers.smc")
scoring = harness.pack_submodule("samplers.scoring")
rewards = harness.pack_submodule("rewards")
tiny_unet = harness.pack_submodule("reference.tiny_unet")


# ----------------------------------------------------------------------------------------------------------- models

SD15_FULL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_FULL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SDXL_TINY = dict(SDXL_FULL, model_channels=32, num_res_blocks=[1, 1], transformer_depth=[0, 1],
                 channel_mult=[1, 2], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1])
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
FLUX_TINY = dict(FLUX_DEV, vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=2, depth=1,
                 depth_single_blocks=1, axes_dim=[8, 12, 12])
KL_VAE_FULL = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
KL_VAE_TINY = dict(KL_VAE_FULL, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)


@dataclasses.dataclass
class Family:
    name: str
    model_class: str                 # comfy.supported_models class
    unet_config: dict
    dtype: torch.dtype
    latent: tuple                    # (C, H, W)
    context: tuple                   # (tokens, width)
    pooled: int | None               # pooled_output width
    cfg: float
    guidance: float | None = None    # Flux guidance embedding
    steps: int = 8
    scheduler: str = "karras"
    vae_ddconfig: dict = dataclasses.field(default_factory=lambda: dict(KL_VAE_FULL))
    full_vae_by_detection: bool = True   # the full-size VAE goes through comfy.sd.VAE's state-dict detection
    memory_cap: bool = False             # run the memory-cap section on this family
    min_device_gib: float = 0.0          # skipped (with the reason recorded) on a smaller device


@dataclasses.dataclass
class Settings:
    families: list
    batches: list                    # plain sampling batch sizes
    demon_ks: list
    smc_particles: list
    steering_batch: int
    repeats: int
    decode_candidates: int
    reward_images: int
    reward_image_size: int
    reward_arches: dict              # row -> open_clip arch
    cap_bytes: int | None            # memory_cap: None = computed from the model (CPU: simulated cap)
    cap_k: int
    rounds: int = 1                  # interleaved rounds of plain + steering (cpu-fullsize)
    warm_up_each_run: bool = True    # False: one 1-step call warms up (a full-size model on a CPU)


def settings_for(mode: str, rounds: int | None) -> Settings:
    if mode == "gpu":
        return Settings(
            families=[Family("sdxl_1024", "SDXL", SDXL_FULL, torch.float16, (4, 128, 128), (77, 2048), 1280, 5.0,
                             steps=8, memory_cap=True),
                      Family("flux_dev_1024", "Flux", FLUX_DEV, torch.bfloat16, (16, 128, 128), (256, 4096), 768,
                             1.0, guidance=3.5, steps=4, scheduler="simple",
                             vae_ddconfig=dict(KL_VAE_FULL, z_channels=16), min_device_gib=40)],
            batches=[1, 2, 4, 8, 16], demon_ks=[8, 16], smc_particles=[8], steering_batch=1, repeats=3,
            decode_candidates=16, reward_images=16, reward_image_size=1024,
            reward_arches={"aesthetic, open_clip ViT-L-14": "ViT-L-14", "CLIP score, open_clip ViT-H-14": "ViT-H-14"},
            cap_bytes=24 * GIB, cap_k=16)
    if mode == "tiny":
        return Settings(
            families=[Family("sdxl_tiny", "SDXL", SDXL_TINY, torch.float32, (4, 16, 16), (77, 2048), 1280, 5.0,
                             steps=3, vae_ddconfig=dict(KL_VAE_TINY), full_vae_by_detection=False, memory_cap=True),
                      Family("flux_tiny", "Flux", FLUX_TINY, torch.float32, (16, 16, 16), (16, 64), 32, 1.0,
                             guidance=3.5, steps=3, scheduler="simple",
                             vae_ddconfig=dict(KL_VAE_TINY, z_channels=16), full_vae_by_detection=False)],
            batches=[1, 2, 4], demon_ks=[2, 4], smc_particles=[2], steering_batch=1, repeats=1,
            decode_candidates=2, reward_images=2, reward_image_size=64,
            reward_arches={"aesthetic, open_clip ViT-S-32 (tiny stand-in for ViT-L-14)": "ViT-S-32",
                           "CLIP score, open_clip ViT-S-32 (tiny stand-in for ViT-H-14)": "ViT-S-32"},
            cap_bytes=None, cap_k=4)
    return Settings(  # cpu-fullsize: item 5, full-size SD1.5 UNet on a 2-core CPU
        families=[Family("sd15_256_cpu", "SD15", SD15_FULL, torch.float32, (4, 32, 32), (77, 768), None, 1.0,
                         steps=3)],
        batches=[1, 4], demon_ks=[4], smc_particles=[4], steering_batch=1, repeats=1, decode_candidates=2,
        reward_images=0, reward_image_size=0, reward_arches={}, cap_bytes=None, cap_k=4,
        rounds=rounds or 2, warm_up_each_run=False)


def fill_random_(module: torch.nn.Module, seed: int, gain: float = 0.5) -> None:
    """Seeded random weights where the tensors live (device, dtype): matrices and kernels N(0, gain^2 / fan_in),
    so activations stay O(1) through a full-depth network in half precision; 1-d weights (norms) 1, biases 0.
    ComfyUI's ops leave weights uninitialised."""
    generators = {}
    with torch.no_grad():
        for name, t in sorted(module.state_dict(keep_vars=True).items()):
            if not t.dtype.is_floating_point or t.numel() == 0:
                continue
            if t.ndim <= 1:
                t.fill_(1.0 if name.endswith("weight") or name.endswith("scale") else 0.0)
                continue
            gen = generators.setdefault(t.device, torch.Generator(device=t.device).manual_seed(seed))
            t.normal_(0.0, gain / math.sqrt(t[0].numel()), generator=gen)


def flux_params(config: dict) -> dict:
    """Fields this host's FluxParams requires beyond the detection defaults (txt_ids_dims since ~v0.5)."""
    import comfy.ldm.flux.model as flux_model
    fields = {f.name for f in dataclasses.fields(flux_model.FluxParams)}
    return dict(config, **({"txt_ids_dims": []} if "txt_ids_dims" in fields else {}))


def build_model(fam: Family, device: torch.device):
    config_class = getattr(comfy.supported_models, fam.model_class)
    unet_config = flux_params(fam.unet_config) if fam.model_class == "Flux" else dict(fam.unet_config)
    cfg = config_class(unet_config)
    cfg.set_inference_dtype(fam.dtype, None)
    base = cfg.get_model({}, device=device)
    fill_random_(base.diffusion_model, seed=0)
    base.eval()
    # offload = load device: the models stay where they were built (ComfyUI would otherwise move a 24 GB Flux
    # to the CPU whenever something else wants room)
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    return patcher, sum(p.numel() for p in base.diffusion_model.parameters())


def conditioning(fam: Family):
    gen = torch.Generator().manual_seed(1)
    extra = {}
    if fam.pooled:
        extra["pooled_output"] = torch.randn(1, fam.pooled, generator=gen)
    if fam.guidance is not None:
        extra["guidance"] = fam.guidance
    return [[torch.randn(1, *fam.context, generator=gen), extra]]


def random_full_vae(fam: Family) -> comfy.sd.VAE:
    """ComfyUI's KL autoencoder (the SD / SDXL / Flux VAE architecture) with random weights, loaded through
    comfy.sd.VAE: by its state-dict detection at full size, by an explicit config at tiny size."""
    z = fam.vae_ddconfig["z_channels"]
    ae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=fam.vae_ddconfig, embed_dim=z)
    fill_random_(ae, seed=2, gain=1.0)
    sd = ae.state_dict()
    if fam.full_vae_by_detection:
        return comfy.sd.VAE(sd=sd)
    vae = comfy.sd.VAE(sd=sd, config={"params": {"ddconfig": fam.vae_ddconfig, "embed_dim": z}})
    vae.latent_channels = z
    return vae


def random_taesd(latent_channels: int) -> comfy.sd.VAE:
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    tiny_unet._init_(taesd, 3, scale=0.1)
    taesd.vae_scale.data.fill_(1.0)
    taesd.vae_shift.data.fill_(0.0)
    return comfy.sd.VAE(sd=taesd.state_dict())


# ---------------------------------------------------------------------------------------------------------- timing

def sync() -> None:
    if torch.cuda.is_available() and mm.get_torch_device().type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, result) of fn(), synchronised with the device."""
    wall, _, out = timed_with_cpu(fn)
    return wall, out


def timed_with_cpu(fn):
    """(wall seconds, this process's CPU seconds, result) of fn().  On a shared CPU the CPU seconds do not count
    the time other processes hold the cores, so ratios of them are steadier than ratios of wall times."""
    sync()
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync()
    return time.perf_counter() - t, time.process_time() - c, out


class Runner:
    """One model family on the device: sampling runs, plain per-item times (memoised by batch size)."""

    def __init__(self, fam: Family, st: Settings, patcher):
        self.fam, self.st, self.patcher = fam, st, patcher
        self.cond = conditioning(fam)
        self.sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), fam.scheduler,
                                                      fam.steps)
        self.per_item: dict[int, float] = {}
        self.per_item_cpu: dict[int, float] = {}
        self.plain_rows: dict[int, dict] = {}

    def sample(self, sampler, batch: int, seed: int = 0, sigmas=None):
        latent = torch.zeros(batch, *self.fam.latent)
        noise = comfy.sample.prepare_noise(latent, seed)
        with torch.inference_mode():
            return comfy.sample.sample_custom(self.patcher, noise, self.fam.cfg, sampler,
                                              self.sigmas if sigmas is None else sigmas, self.cond, self.cond,
                                              latent, disable_pbar=True, seed=seed)

    def plain(self, batch: int, repeats: int | None = None) -> dict:
        euler = comfy.samplers.sampler_object("euler")
        times = [timed_with_cpu(lambda: self.sample(euler, batch))[:2] for _ in range(repeats or self.st.repeats)]
        walls = [w for w, _ in times]
        steps = len(self.sigmas) - 1
        wall, cpu = statistics.median(walls), statistics.median(c for _, c in times)
        row = {"batch": batch, "seconds_per_call": wall / steps, "seconds_per_item": wall / (steps * batch),
               "items_per_second": steps * batch / wall, "repeats": len(walls), "wall_seconds": walls,
               "cpu_seconds_per_item": cpu / (steps * batch)}
        self.per_item[batch] = row["seconds_per_item"]
        self.per_item_cpu[batch] = row["cpu_seconds_per_item"]
        self.plain_rows[batch] = row
        return row

    def per_item_at(self, batch: int) -> float:
        if batch not in self.per_item:   # a chunk size outside the sweep: measured now, in the same run
            self.plain(batch)
        return self.per_item[batch]

    def expected_seconds(self, calls: list[tuple[int, int]], cpu: bool = False) -> float:
        """sum of items x plain per-item time (wall, or CPU) at the call's batch, over (batch size, number of
        calls)."""
        for size, n in calls:
            self.per_item_at(size)
        per_item = self.per_item_cpu if cpu else self.per_item
        return sum(n * size * per_item[size] for size, n in calls if n)


@contextlib.contextmanager
def recording_chunks(record: list):
    """Record the chunk sizes (items per model call) the samplers' automatic chunking chooses."""
    originals = {m: m.items_per_call for m in (demon, smc)}

    def wrap(inner):
        def items_per_call(*args, **kwargs):
            chunk = inner(*args, **kwargs)
            record.append(chunk)
            return chunk
        return items_per_call

    for m, inner in originals.items():
        m.items_per_call = wrap(inner)
    try:
        yield
    finally:
        for m, inner in originals.items():
            m.items_per_call = inner


def call_sizes(n_items: int, chunk: int) -> list[tuple[int, int]]:
    """(batch size, count) of the model calls that n_items candidates take in chunks of `chunk`."""
    chunk = min(chunk, n_items)
    full, rest = divmod(n_items, chunk)
    return [(chunk, full)] + ([(rest, 1)] if rest else [])


def steering_run(runner: Runner, kind: str, n: int, decoder: str = "latent_rgb", vae=None, repeats=None) -> dict:
    """Demon (n = K) or SMC (n = particles) at the steering batch: wall time, calls, overhead ratio, throughput."""
    fam, st = runner.fam, runner.st
    batch = st.steering_batch
    reward = rewards.LinearColorReward.toward((0.9, 0.2, 0.2))
    inner_score = scoring.make_latent_scorer(vae, reward, decoder=decoder)
    score_seconds = [0.0]

    def score(*a, **k):
        t, out = timed(lambda: inner_score(*a, **k))
        score_seconds[0] += t
        return out

    summary, chunks = {}, []
    report = lambda s: summary.update(s) if s.get("done") else None  # noqa: E731
    if kind == "demon":
        options = {"score_fn": score, "k": n, "beta": 0.1, "estimator": "tweedie", "report": report}
        fn = demon.sample_demon
    else:
        options = {"score_fn": score, "particles": n, "lam": 10.0, "output": "best", "report": report}
        fn = smc.sample_smc
    sampler = comfy.samplers.KSAMPLER(fn, extra_options=options)
    walls, cpus, scores, out = [], [], [], None
    with recording_chunks(chunks):
        if st.warm_up_each_run:
            runner.sample(sampler, batch)
        for _ in range(repeats or st.repeats):
            score_seconds[0] = 0.0
            wall, cpu, out = timed_with_cpu(lambda: runner.sample(sampler, batch))
            walls.append(wall)
            cpus.append(cpu)
            scores.append(score_seconds[0])
    wall = statistics.median(walls)
    chunk = chunks[-1]
    steps = len(runner.sigmas) - 1
    calls_per_image = summary["model_calls_per_image"]
    if kind == "demon":
        base_calls = [(batch, steps)]
        cand_items = round(calls_per_image * batch) - steps * batch
        per_step = n * batch
        cand_calls = [(size, count * (cand_items // per_step)) for size, count in call_sizes(per_step, chunk)]
    else:
        base_calls = []
        cand_items = round(calls_per_image * batch)
        cand_calls = [(size, count * steps) for size, count in call_sizes(n * batch, chunk)]
    expected = runner.expected_seconds(base_calls + cand_calls)
    peak = max(r["items_per_second"] for r in runner.plain_rows.values())
    model_items = calls_per_image * batch
    # the candidate calls' part of the wall: their share of the expected time (the overhead spread evenly)
    cand_wall = wall * runner.expected_seconds(cand_calls) / expected
    return {
        "sampler": kind, "n": n, "batch": batch, "decoder": decoder, "steps": steps,
        "model_calls_per_image": calls_per_image, "batched_model_calls": summary["batched_model_calls"],
        "model_calls_by_batch": [[size, count] for size, count in base_calls + cand_calls if count],
        "chunk_items": chunk, "wall_seconds": wall, "wall_seconds_all": walls, "seconds_per_image": wall / batch,
        "decode_and_score_seconds": statistics.median(scores),
        "expected_seconds_from_plain": expected,
        "overhead_ratio": wall / expected,
        "overhead_ratio_excluding_decode_and_score": (wall - statistics.median(scores)) / expected,
        "cpu_seconds": statistics.median(cpus),
        "overhead_ratio_cpu_time": statistics.median(cpus) / runner.expected_seconds(base_calls + cand_calls,
                                                                                     cpu=True),
        "items_per_second": model_items / wall,
        "throughput_share_all_calls": model_items / wall / peak,
        "throughput_share_candidate_calls": cand_items / cand_wall / peak,
        "output_finite": bool(torch.isfinite(out).all()),
    }


# -------------------------------------------------------------------------------------------------------- sections

def section(results: dict, name: str, fn):
    """Run one section; a failure is recorded with its error and the benchmark goes on."""
    wanted = [s for s in (ARGS.sections if ARGS else "").split(",") if s]
    if wanted and name.split(":")[0] not in wanted + ["build", "build_vae"]:
        return None
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    t = time.perf_counter()
    try:
        out = fn()
        results[name] = out
    except Exception as e:  # noqa: BLE001  (a benchmark section must not take the rest down)
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        print(f"    FAILED after {time.perf_counter() - t:.1f}s: {type(e).__name__}: {e}", flush=True)
        return None
    else:
        try:
            summary = summarise(out)
        except Exception as e:  # noqa: BLE001  (the console line is a convenience; the JSON is the result)
            summary = f"(no summary: {type(e).__name__})"
        print(f"    done in {time.perf_counter() - t:.1f}s: {summary}", flush=True)
        return out
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def summarise(out) -> str:
    rows = out.get("rows") if isinstance(out, dict) else None
    if isinstance(rows, list) and rows and "overhead_ratio" in rows[0]:
        return ", ".join(f"{r['sampler']} {r['n']} {r['decoder']}: overhead {r['overhead_ratio']:.3f}"
                         + (f" (CPU time {r['overhead_ratio_cpu_time']:.3f})" if "overhead_ratio_cpu_time" in r
                            else "")
                         + (f", share {r['throughput_share_candidate_calls']:.2f}"
                            if "throughput_share_candidate_calls" in r else "") for r in out["rows"])
    if isinstance(out, dict) and "peak_items_per_second" in out:
        return f"peak {out['peak_items_per_second']:.3g} items/s at batch {out['peak_batch']}"
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                     (out.items() if isinstance(out, dict) else []) if not isinstance(v, (dict, list)))[:300]


def plain_section(runner: Runner, warm_up: bool = True) -> dict:
    if warm_up and runner.st.warm_up_each_run:
        runner.plain(max(runner.st.batches), repeats=1)   # warm-up at the largest batch
    elif warm_up:   # one model call at the largest batch
        runner.sample(comfy.samplers.sampler_object("euler"), max(runner.st.batches), sigmas=runner.sigmas[-2:])
    rows = [runner.plain(b) for b in runner.st.batches]
    best = max(rows, key=lambda r: r["items_per_second"])
    return {"rows": rows, "peak_items_per_second": best["items_per_second"], "peak_batch": best["batch"]}


def steering_section(runner: Runner, vae_taesd) -> dict:
    st = runner.st
    rows = [steering_run(runner, "demon", k) for k in st.demon_ks]
    rows += [steering_run(runner, "smc", n) for n in st.smc_particles]
    if ARGS is not None and ARGS.mode == "cpu-fullsize":   # the same Demon run decoding through a random TAESD
        rows.append(steering_run(runner, "demon", st.demon_ks[-1], decoder="vae", vae=vae_taesd))
    return {"rows": rows}


def decode_section(runner: Runner, vaes: dict) -> dict:
    fam, st = runner.fam, runner.st
    n = st.decode_candidates
    x0 = torch.randn(n, *fam.latent, generator=torch.Generator().manual_seed(4)).to(mm.get_torch_device())
    base = runner.patcher.model
    decoders = {name: (lambda v=v: v.decode(base.process_latent_out(x0))) for name, v in vaes.items()}
    decoders["latent_rgb"] = lambda: scoring.latent_rgb_decode(base, x0)
    model_item = runner.per_item_at(max(runner.st.batches))
    rows = {}
    for name, fn in decoders.items():
        with torch.inference_mode():
            image = fn()   # warm-up (loads the VAE)
            walls = [timed(fn)[0] for _ in range(st.repeats)]
        per = statistics.median(walls) / n
        rows[name] = {"candidates": n, "seconds_per_candidate": per, "image_shape": list(image.shape),
                      "relative_to_model_item": per / model_item, "finite": bool(torch.isfinite(image).all())}
    return {"rows": rows, "model_seconds_per_item_at_peak_batch": model_item}


@contextlib.contextmanager
def memory_cap(cap_bytes: int, model_bytes: int):
    """A device that looks cap_bytes big.  CUDA: the per-process memory fraction caps the allocator at cap +
    ballast, and the ballast holds everything above the cap, so cudaMemGetInfo (ComfyUI's free memory) agrees.
    CPU: no allocator cap exists, so ComfyUI's free-memory queries are capped instead (a simulation that checks the
    chunking arithmetic, not real memory)."""
    info = {"cap_bytes": cap_bytes}
    if mm.get_torch_device().type == "cuda":
        sync()
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        held = torch.cuda.memory_reserved()
        ballast_bytes = max(0, free - max(0, cap_bytes - held))
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device="cuda") if ballast_bytes else None
        fraction = min(1.0, (cap_bytes + ballast_bytes) / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        torch.cuda.reset_peak_memory_stats()
        info.update({"kind": "cuda: set_per_process_memory_fraction + ballast", "device_total_bytes": total,
                     "ballast_bytes": ballast_bytes, "memory_fraction": fraction,
                     "free_bytes_seen": mm.get_free_memory(mm.get_torch_device())})
        try:
            yield info
        finally:
            sync()
            info["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() - ballast_bytes
            info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved() - ballast_bytes
            del ballast
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
        return
    capped = max(0, cap_bytes - model_bytes)
    originals = {"mm": mm.get_free_memory, "patcher": getattr(comfy.model_patcher.ModelPatcher, "get_free_memory",
                                                                None)}

    def cap(free):   # get_free_memory(torch_free_too=True) answers (total free, torch free)
        return tuple(min(f, capped) for f in free) if isinstance(free, tuple) else min(free, capped)

    mm.get_free_memory = lambda *a, **k: cap(originals["mm"](*a, **k))
    if originals["patcher"] is not None:
        comfy.model_patcher.ModelPatcher.get_free_memory = \
            lambda self, *a, **k: cap(originals["patcher"](self, *a, **k))
    info.update({"kind": "cpu: simulated (ComfyUI's free-memory queries capped at cap - model bytes)",
                 "free_bytes_seen": capped})
    try:
        yield info
    finally:
        mm.get_free_memory = originals["mm"]
        if originals["patcher"] is not None:
            comfy.model_patcher.ModelPatcher.get_free_memory = originals["patcher"]


def memory_cap_section(runner: Runner, model_bytes: int) -> dict:
    st, fam = runner.st, runner.fam
    k, batch = st.cap_k, st.steering_batch
    # what one candidate costs, as the chunking estimates it (cond and uncond run together under CFG)
    per_item = runner.patcher.model.memory_required([1, *fam.latent]) * 2
    cap = st.cap_bytes
    if cap is None:   # tiny: a cap that fits half the candidates, so the chunking has to split them
        cap = int(model_bytes + math.ceil(k * batch / 2) * per_item / 0.8 + per_item / 4)
    chunks, summary = [], {}
    reward = rewards.LinearColorReward.toward((0.9, 0.2, 0.2))
    sampler = comfy.samplers.KSAMPLER(demon.sample_demon, extra_options={
        "score_fn": scoring.make_latent_scorer(None, reward, decoder="latent_rgb"), "k": k, "beta": 0.1,
        "report": lambda s: summary.update(s) if s.get("done") else None})
    with memory_cap(cap, model_bytes) as info, recording_chunks(chunks):
        wall, out = timed(lambda: runner.sample(sampler, batch))
    fit = int(info["free_bytes_seen"] * 0.8 // per_item)
    result = {**info, "k": k, "batch": batch, "model_bytes": model_bytes, "per_item_estimate_bytes": per_item,
              "items_that_fit": fit, "chunk_items": chunks, "candidates_per_step": k * batch,
              "chunked": any(c < k * batch for c in chunks), "wall_seconds": wall,
              "batched_model_calls": summary.get("batched_model_calls"),
              "estimated_peak_bytes": model_bytes + max(chunks) * per_item,
              "output_finite": bool(torch.isfinite(out).all())}
    result["chunks_respect_cap"] = all(c <= max(batch, fit) for c in chunks)
    if "peak_allocated_bytes" in result:
        result["measured_peak_within_cap"] = result["peak_allocated_bytes"] <= cap
    return result


def rewards_section(st: Settings) -> dict:
    import reward_bench   # its random open_clip builder (the bench scripts share one ComfyUI bootstrap)
    aesthetic = harness.pack_submodule("rewards.aesthetic")
    clip_score = harness.pack_submodule("rewards.clip_score")
    n, size = st.reward_images, st.reward_image_size
    images = torch.rand(n, size, size, 3, generator=torch.Generator().manual_seed(5))
    rows, clips = {}, {}
    for name, arch in st.reward_arches.items():
        if arch not in clips:   # one model per architecture, freed once no later row needs it
            clips = {arch: reward_bench.random_clip(arch, "auto")}
        clip = clips[arch]
        if name.startswith("aesthetic"):
            dims = [clip.embed_dim, 1024, 128, 64, 16, 1]
            gen = torch.Generator().manual_seed(6)
            head = aesthetic.AestheticHead({f"layers.{layer}.{kind}": (torch.randn(o, i, generator=gen) * 0.02
                                                                        if kind == "weight" else torch.zeros(o))
                                            for layer, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:]))
                                            for kind in ("weight", "bias")})
            reward = aesthetic.AestheticReward(clip, head)
        else:
            reward = clip_score.ClipScoreReward(clip, "a photo of a cat")
        with torch.inference_mode():
            reward(images[:1])   # warm-up (loads the model)
            batched = statistics.median(timed(lambda: reward(images))[0] for _ in range(st.repeats))
            single = statistics.median(timed(lambda: [reward(images[i:i + 1]) for i in range(n)])[0]
                                       for _ in range(st.repeats))
            scores = reward(images)
        rows[name] = {"arch": arch, "precision": str(clip.dtype), "images": n, "image_size": size,
                      "ms_per_image_batched": 1000 * batched / n, "ms_per_image_one_at_a_time": 1000 * single / n,
                      "speedup": single / batched, "finite": bool(torch.isfinite(scores).all())}
        del reward, clip
        gc.collect()
    return {"rows": rows}


def family_sections(fam: Family, st: Settings, results: dict) -> None:
    device = mm.get_torch_device()
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if total < fam.min_device_gib * GIB:
            results[f"build:{fam.name}"] = {"skipped": f"{total / GIB:.0f} GiB device; {fam.name} needs about "
                                                       f"{fam.min_device_gib:.0f} GiB (weights and batch-16 calls)"}
            print(f"skipping {fam.name}: {results[f'build:{fam.name}']['skipped']}", flush=True)
            return
    built = section(results, f"build:{fam.name}", lambda: _build(fam, device))
    if not built:
        return
    patcher = built.pop("_patcher")
    runner = Runner(fam, st, patcher)
    vaes = {}
    taesd = section(results, f"build_vae:{fam.name}", lambda: _build_vaes(fam, vaes))
    section(results, f"plain:{fam.name}", lambda: plain_section(runner))
    for round_index in range(st.rounds):
        name = f"steering:{fam.name}" + (f":round{round_index + 1}" if st.rounds > 1 else "")
        if round_index > 0:   # interleaved: this round's overheads against this round's plain times
            runner.per_item.clear()
            section(results, f"plain:{fam.name}:round{round_index + 1}", lambda: plain_section(runner, False))
        section(results, name, lambda: steering_section(runner, vaes.get("taesd")))
    if st.rounds > 1:
        section(results, f"steering_min_over_rounds:{fam.name}", lambda: min_over_rounds(fam.name, results))
    if taesd is not None:
        section(results, f"decode:{fam.name}", lambda: decode_section(runner, vaes))
    if fam.memory_cap:
        section(results, f"memory_cap:{fam.name}", lambda: memory_cap_section(runner, built["model_bytes"]))
    del runner, patcher, vaes
    mm.unload_all_models()
    mm.soft_empty_cache()
    gc.collect()


def min_over_rounds(name: str, results: dict) -> dict:
    """Each run's fastest time over the rounds, plain and steering alike, and the overheads from those: on a shared
    CPU the contention changes between rounds, and the minimum is the least disturbed time of each."""
    plains = [results[k]["rows"] for k in results if k.startswith(f"plain:{name}") and "rows" in results[k]]
    per_item, per_item_cpu = {}, {}
    for rows in plains:
        for r in rows:
            per_item[r["batch"]] = min(per_item.get(r["batch"], math.inf), r["seconds_per_item"])
            per_item_cpu[r["batch"]] = min(per_item_cpu.get(r["batch"], math.inf), r["cpu_seconds_per_item"])
    rounds = [results[k]["rows"] for k in results if k.startswith(f"steering:{name}") and "rows" in results[k]]
    out = []
    for runs in zip(*rounds):
        wall, cpu = min(r["wall_seconds"] for r in runs), min(r["cpu_seconds"] for r in runs)
        calls = runs[0]["model_calls_by_batch"]
        expected = sum(size * count * per_item[size] for size, count in calls)
        expected_cpu = sum(size * count * per_item_cpu[size] for size, count in calls)
        out.append({key: runs[0][key] for key in ("sampler", "n", "decoder", "model_calls_per_image")} |
                   {"wall_seconds_min": wall, "expected_seconds_from_plain_min": expected,
                    "overhead_ratio": wall / expected,
                    "overhead_ratio_per_round": [r["overhead_ratio"] for r in runs],
                    "overhead_ratio_cpu_time": cpu / expected_cpu,
                    "overhead_ratio_cpu_time_per_round": [r["overhead_ratio_cpu_time"] for r in runs]})
    return {"rounds": len(rounds), "plain_seconds_per_item_min": {str(b): v for b, v in per_item.items()},
            "plain_cpu_seconds_per_item_min": {str(b): v for b, v in per_item_cpu.items()}, "rows": out}


def _build(fam: Family, device) -> dict:
    seconds, (patcher, params) = timed(lambda: build_model(fam, device))
    model_bytes = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    return {"_patcher": patcher, "model_class": fam.model_class, "parameters": params, "model_bytes": model_bytes,
            "dtype": str(fam.dtype), "latent": list(fam.latent), "cfg": fam.cfg, "steps": fam.steps,
            "scheduler": fam.scheduler, "build_seconds": seconds}


def _build_vaes(fam: Family, vaes: dict) -> dict:
    vaes["vae"] = random_full_vae(fam)
    vaes["taesd"] = random_taesd(fam.latent[0])
    return {name: {"latent_channels": v.latent_channels,
                   "parameters": sum(p.numel() for p in v.first_stage_model.parameters())} for name, v in vaes.items()}


# ------------------------------------------------------------------------------------------------------ the report

def environment(mode: str) -> dict:
    device = mm.get_torch_device()
    try:
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except ImportError:
        comfy_version = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"mode": mode, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "comfyui": comfy_version,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "pack_commit": commit,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}




def main() -> int:
    args = ARGS
    st = settings_for(args.mode, args.rounds)
    st.rounds = args.rounds or st.rounds
    if args.mode != "gpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    results: dict = {}
    report = {"environment": environment(args.mode), "settings": {
        "batches": st.batches, "demon_ks": st.demon_ks, "smc_particles": st.smc_particles,
        "steering_batch": st.steering_batch, "repeats": st.repeats, "rounds": st.rounds,
        "families": {f.name: {"class": f.model_class, "latent": list(f.latent), "steps": f.steps, "cfg": f.cfg}
                     for f in st.families},
        "overhead_definition": "wall / sum over the run's model calls of (items in the call x per-item seconds of "
                               "plain Euler sampling at that call's batch size), plain measured in the same run"},
        "sections": results}
    print(f"gpu_bench mode={args.mode} device={report['environment']['device_name']} "
          f"ComfyUI {report['environment']['comfyui']} torch {torch.__version__}", flush=True)
    families = [f for f in args.families.split(",") if f]
    for fam in st.families:
        if not families or fam.name in families:
            family_sections(fam, st, results)
    if st.reward_arches and (not families or "rewards" in args.sections.split(",")):
        section(results, "rewards", lambda: rewards_section(st))
    report["total_seconds"] = time.perf_counter() - started
    if args.merge and args.out.exists():   # earlier commands' sections stay unless this run redid them
        earlier = json.loads(args.out.read_text())
        report["sections"] = results = {**earlier.get("sections", {}), **results}
        report["environment"]["merged_runs"] = earlier["environment"].get("merged_runs", 1) + 1
        report["total_seconds"] += earlier.get("total_seconds", 0.0)
    report["failed_sections"] = [name for name, sec in results.items() if isinstance(sec, dict) and "error" in sec]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    try:
        plotting.gpu_plot(report, args.out.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped: {type(e).__name__}: {e}")
    print(f"wrote {args.out} in {report['total_seconds']:.1f}s; failed sections: {report['failed_sections'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
