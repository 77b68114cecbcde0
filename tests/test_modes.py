"""The credit-mode registry: what each mode declares, and that a new mode is one function and one entry."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from atrl.credit import (
    Choice,
    CreditOptions,
    PendingCredit,
    ResponseScores,
    assign_credit,
    credit_mode,
    credit_mode_names,
    register_credit_mode,
)
from atrl.credit import modes as modes_module
from atrl.rl.config import AnchorConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "atrl"


def _first_half(s: ResponseScores, o: CreditOptions, row: int) -> Choice:
    """A new mode for the tests: the first half of each response weighted 3, the rest 1."""
    chosen = np.arange(s.n) < s.n // 2
    return Choice(boosted=chosen, weights=np.where(chosen, 3.0, 1.0))


@pytest.fixture
def first_half():
    register_credit_mode("first_half", measure="probes", help="the first half of each response, x3")(_first_half)
    yield "first_half"
    modes_module._MODES.pop("first_half")


def test_the_built_in_modes_declare_what_they_need():
    assert credit_mode_names() == ("uniform", "atrl", "anchors_only", "low_only", "random", "threshold",
                                   "entropy_per_response", "entropy_8020", "blank_image_kl", "vppo")
    needs = {n: (credit_mode(n).needs_probes, credit_mode(n).needs_entropy, credit_mode(n).extra_forwards(False),
                 credit_mode(n).extra_forwards(True), credit_mode(n).graph) for n in credit_mode_names()}
    assert needs["uniform"] == (False, False, 0, 0, False)
    assert needs["atrl"] == needs["low_only"] == needs["anchors_only"] == needs["random"] == (True, False, 0, 0, True)
    assert needs["threshold"] == (True, False, 0, 0, False)
    assert needs["entropy_per_response"] == needs["entropy_8020"] == (False, True, 0, 0, False)
    assert needs["blank_image_kl"] == (False, False, 2, 2, False)
    assert needs["vppo"] == (False, False, 2, 1, False)
    assert not credit_mode("vppo").normalize and not credit_mode("entropy_8020").normalize
    assert credit_mode("atrl").normalize and credit_mode("atrl").batch_stat is None
    with pytest.raises(ValueError, match="credit mode 'nope' is unknown; choose from .*'atrl'"):
        credit_mode("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_credit_mode("atrl", measure="probes", help="again")(_first_half)
    with pytest.raises(ValueError, match="measure 'eyes' is unknown"):
        register_credit_mode("new", measure="eyes", help="?")


def test_a_new_mode_is_one_function_and_one_entry(first_half):
    """Registered, the mode is accepted by CreditOptions and AnchorConfig, runs in assign_credit (in this process
    and on worker processes) and reports what it needs to the trainer, with nothing else changed."""
    conn = torch.rand(3, 10, generator=torch.Generator().manual_seed(0))
    prof = torch.rand(3, 10, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False  # a 6-token response
    res = assign_credit(conn, prof, mask, CreditOptions(mode=first_half))
    # hand-computed: 10 tokens, 5 at 3 and 5 at 1, mean 2 -> 1.5 and 0.5; 6 tokens: 3 at 3, 3 at 1 -> same
    assert res.weights[0].tolist() == pytest.approx([1.5] * 5 + [0.5] * 5)
    assert res.weights[1].tolist() == pytest.approx([1.5] * 3 + [0.5] * 3 + [0.0] * 4)
    assert res.boosted_mask[1].tolist() == [True] * 3 + [False] * 7
    assert res.anchor_fraction.tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert (res.parts == -1).all()  # no partition made
    pooled = PendingCredit(CreditOptions(mode=first_half, n_workers=2)).submit(conn, prof, mask).result()
    assert torch.equal(pooled.weights, res.weights)

    anchor = AnchorConfig(mode=first_half)
    assert anchor.needs_probe and anchor.credit_mode.scored_in_forward and anchor.credit_mode.extra_forwards(True) == 0
    assert anchor.credit_options().mode == first_half


def test_a_new_mode_trains(tmp_path, first_half):
    from test_trainer import _params, _trainer

    trainer = _trainer(tmp_path, anchor=AnchorConfig(mode=first_half, report_steps=0))
    before = _params(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["atrl/anchor_fraction"] == pytest.approx(0.5, abs=0.1) for h in logs)
    w, m = trainer.last_credit["result"].weights, trainer.last_credit["mask"]
    assert all(w[b, m[b]][0] > w[b, m[b]][-1] for b in range(w.shape[0]) if m[b].sum() > 1)
    after = _params(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_no_module_outside_the_registry_compares_mode_names():
    names = "|".join(credit_mode_names())
    compare = re.compile(rf"mode\s*(==|!=)\s*[\"']({names})[\"']|mode\s+(not\s+)?in\s+\(\s*[\"']({names})[\"']")
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "modes.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if compare.search(line)]
    assert found == []
