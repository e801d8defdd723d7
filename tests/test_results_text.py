"""Costs and results as text on the node (issue 16, item 6), through ComfyUI's real executor.

A steering node first shows its planned cost (model calls per image and the multiple of a plain run), then one
short text per step, then what it spent; the final text is its UI output (kept in /history, drawn on the node by
web/results_text.js).  Every line stays short enough to read at a node's width, whatever the batch size."""
from __future__ import annotations

import re

import pytest

from test_demon import ksampler_demon_prompt
from test_smc import smc_node_inputs
from test_tree import best_of_n_prompt, ksampler_tree_prompt
import harness

MAX_LINE = 64   # characters: a default-width node shows about this many at the frontend's text size


def node_texts(executor) -> list[str]:
    """The progress texts the run sent (ComfyUI's binary "text" event: a node id header, then UTF-8 text)."""
    return [m[1].decode("utf-8", errors="replace") for m in executor.messages if isinstance(m[1], (bytes, bytearray))]


def ours(texts: list[str]) -> list[str]:
    return [t for t in texts if re.search(r"planned:|step \d+/|done|rollouts", t)]


def calls(text: str, what: str) -> float:
    match = re.search(rf"{what}:(?: up to)? (\d+) model calls per image\n  = ([\d.]+)x a plain", text)
    assert match, (what, text)
    return float(match.group(1))


def assert_short_lines(texts: list[str]) -> None:
    for text in texts:
        for line in text.split("\n")[1:] + [text.split("\n")[0][-MAX_LINE:]]:   # the first line has a binary header
            assert len(line) <= MAX_LINE, (len(line), line)


def test_demon_shows_plan_steps_and_spent_cost_with_short_lines(executor):
    """Batch 8 (so per-item lists would overflow), K 3, 6 steps, tweedie: the plan comes first and equals what the
    run spends (steps + K x steered steps); the UI text says both."""
    executor.run(ksampler_demon_prompt("eps", batch=8, k=3, steps=6), want=("3",))
    texts = ours(node_texts(executor))
    totals = executor.history["outputs"]["3"]["demon"][0]
    spent = totals["model_calls_per_image"]
    assert spent == 6 + 3 * totals["steered_steps"]
    assert "planned:" in texts[0] and calls(texts[0], "planned") == spent
    assert any("step 3/6" in t and "candidates' mean: mean" in t for t in texts)   # batch summarised
    final = executor.history["outputs"]["3"]["text"][0]
    assert calls(final, "spent") == spent and calls(final, "planned") == spent
    assert f"  = {spent / 6:.1f}x a plain 6-step run" in final
    assert_short_lines(texts + [final])


def test_demon_budget_plan_is_what_it_spends(executor):
    """budget 20 calls per image at K 4 over 8 steps: K is lowered to fit, and the plan shown says so."""
    executor.run(ksampler_demon_prompt("eps", batch=2, k=4, steps=8, budget=20), want=("3",))
    texts = ours(node_texts(executor))
    spent = executor.history["outputs"]["3"]["demon"][0]["model_calls_per_image"]
    assert calls(texts[0], "planned") == spent <= 20


def test_smc_and_best_of_n_show_plan_and_spent_cost(executor):
    prompt = {
        "1": harness.reference_model_node("flow"),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 6}},
        "3": harness.red_reward_node(),
        "9": {"class_type": "RewardSteerKSamplerSMC",
              "inputs": {"model": ["1", 0], "seed": 1, "steps": 10, "cfg": 1.0, "scheduler": "simple",
                         "positive": ["1", 2], "negative": ["1", 2], "latent_image": ["2", 0], "denoise": 1.0,
                         "reward": ["3", 0], "vae": ["1", 1], **smc_node_inputs(particles=5)}},
    }
    executor.run(prompt, want=("9",))
    texts = ours(node_texts(executor))
    ui = executor.history["outputs"]["9"]
    spent = ui["smc"][0]["model_calls_per_image"]
    assert spent == 50 and calls(texts[0], "planned") == 50
    assert calls(ui["text"][0], "spent") == 50 and "= 5.0x a plain 10-step run" in ui["text"][0]
    assert any("ESS: mean" in t for t in texts)
    assert_short_lines(texts + ui["text"])

    executor.run(best_of_n_prompt(n=3, batch=2), want=("3",))
    text = executor.history["outputs"]["3"]["text"][0]
    assert text.startswith("best of 3: ") and "planned: 3 seeds per image = 3x a plain run" in text
    executor.run(best_of_n_prompt(n=4, batch=2, prune_at="0.5", keep_fraction=0.25, spend_saved_calls=True),
                 want=("3",))
    ui = executor.history["outputs"]["3"]
    plan = ui["best_of_n"][0]["plan"]
    assert f"planned: {plan['planned_calls_per_image']:.0f} model calls per image" in ui["text"][0]


def test_tree_plan_bounds_what_it_spends(executor):
    executor.run(ksampler_tree_prompt(batch=2, rollouts=4, max_calls=40), want=("3",))
    texts = ours(node_texts(executor))
    ui = executor.history["outputs"]["3"]
    planned = calls(texts[0], "planned")
    assert "up to" in texts[0] and planned == 40
    assert max(ui["tree"][0]["model_calls"]) <= planned
    assert "spent:" in ui["text"][0] and "best reward:" in ui["text"][0]
    assert_short_lines(texts + ui["text"])


@pytest.mark.parametrize("values, expected", [([0.5], "0.5"), ([1, 2, 3], "1, 2, 3"),
                                               ([1, 2, 3, 6], "mean 3 (1 .. 6, 4 items)"), ([None], "none yet")])
def test_batch_text(values, expected):
    assert harness.pack_submodule("nodes.sampling").batch_text(values) == expected
