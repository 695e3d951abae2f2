"""The named runs of the ResNet20 table and the ablation, and the command that computes them."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hawqlib import __main__ as cli
from hawqlib import experiments, pipeline, profiles, size
from hawqlib.blocks import quant_blocks
from hawqlib.models import resnet20


def _model_and_spectra():
    torch.manual_seed(0)
    net = resnet20().eval()
    # A made-up spectrum with distinct eigenvalues, so that S, Omega and their reverses all differ.
    spectra = [SimpleNamespace(name=b.name, numel=b.numel, eigenvalue=float(1 + (7 * i) % 20))
               for i, b in enumerate(quant_blocks(net, "layer"))]
    return net, spectra


@pytest.fixture(scope="module")
def cpu_specs():
    """The cpu profile's run specs for ResNet20 with a made-up spectrum (the allocations take seconds)."""
    net, spectra = _model_and_spectra()
    P = profiles.get("cpu")
    return net, spectra, P, experiments.run_specs(net, spectra, P)


def test_run_specs_name_every_row_of_the_table_and_the_ablation(cpu_specs):
    net, spectra, P, specs = cpu_specs
    assert list(specs) == experiments.run_names(P)
    assert list(specs) == ["hawq", "W4A4", "W2A4", "alloc-reverse", "alloc-random", "order-reverse", "order-random"]
    hawq = specs["hawq"]
    assert list(hawq.order) == pipeline.order_blocks(net, spectra, hawq.bit_config, "omega")
    assert specs["order-reverse"].order == hawq.order[::-1]
    assert specs["order-reverse"].bit_config is hawq.bit_config
    assert specs["order-random"].order != hawq.order and sorted(specs["order-random"].order) == sorted(hawq.order)
    for w in (4, 2):
        d = specs[f"W{w}A4"]
        assert d.direct and d.order is None and set(d.bit_config.weights.values()) == {w}
    budget = size.model_size_bytes(net, None) / next(iter(P["allocation"]["targets"].values()))
    for n in ("hawq", "alloc-reverse", "alloc-random"):
        bc = specs[n].bit_config
        assert size.model_size_bytes(net, bc) <= budget and bc.act_bits == P["allocation"]["act_bits"]
        assert sorted(specs[n].order) == sorted(b.name for b in quant_blocks(net, "layer"))
    assert specs["alloc-reverse"].bit_config.to_dict() != hawq.bit_config.to_dict()


def test_run_names_groups_select_the_table_and_the_ablation():
    P = profiles.get("cpu")
    assert experiments.run_names(P, "table") == ["hawq", "W4A4", "W2A4"]
    assert experiments.run_names(P, "ablation") == ["hawq", "alloc-reverse", "alloc-random", "order-reverse",
                                                    "order-random"]
    with pytest.raises(ValueError, match=r"unknown group 'tabel'; valid: table, ablation"):
        experiments.run_names(P, "tabel")


def test_run_specs_builds_only_the_runs_asked_for(cpu_specs, monkeypatch):
    net, spectra, P, specs = cpu_specs
    policies = []
    real = experiments.allocation
    monkeypatch.setattr(experiments, "allocation", lambda m, s, P, policy: policies.append(policy) or real(m, s, P, policy))
    some = experiments.run_specs(net, spectra, P, ["order-reverse", "W2A4"])
    assert list(some) == ["order-reverse", "W2A4"] and policies == ["hawq"]
    assert some["order-reverse"] == specs["order-reverse"] and some["W2A4"] == specs["W2A4"]
    assert experiments.run_specs(net, spectra, P, ["W4A4"])["W4A4"] == specs["W4A4"] and policies == ["hawq"]
    with pytest.raises(ValueError, match=r"unknown run\(s\) alloc-hawq for profile 'cpu'; valid: hawq, W4A4"):
        experiments.run_specs(net, spectra, P, ["hawq", "alloc-hawq"])


def test_run_hands_the_spec_to_finetuned(cpu_specs, monkeypatch):
    net, spectra, P, specs = cpu_specs
    calls = []
    monkeypatch.setattr(pipeline, "finetuned", lambda *a, **k: calls.append((a, k)) or "result")
    assert experiments.run(net, "base", specs["W2A4"], P) == "result"
    assert experiments.run(net, "base", specs["order-reverse"], P, progress=True) == "result"
    (a1, k1), (a2, k2) = calls
    assert a1[1:] == ("base", specs["W2A4"].bit_config, None, P["finetune"]) and k1["direct"] is True
    assert a2[3] == list(specs["order-reverse"].order) and k2["direct"] is False and k2["progress"] is True


def test_finetune_command_rejects_an_unknown_run_before_loading_anything(monkeypatch):
    monkeypatch.setattr(pipeline, "baseline", lambda *a, **k: pytest.fail("the baseline was loaded"))
    with pytest.raises(SystemExit, match=r"unknown run\(s\) W3A3 .*valid: hawq, W4A4, W2A4, alloc-reverse"):
        cli.main(["finetune", "--profile", "smoke", "hawq", "W3A3"])


@pytest.mark.parametrize("bad", ["-1", "two"])
def test_threads_must_be_a_whole_number(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--profile", "smoke", "--threads", bad])
    assert "must be a whole number >= 0" in capsys.readouterr().err


def test_finetune_command_runs_the_named_rows_in_order(cpu_specs, monkeypatch, capsys):
    net, spectra, _, specs = cpu_specs
    monkeypatch.setattr(pipeline, "baseline", lambda *a, **k: (net, {}, Path("/tmp/baseline_resnet20-x")))
    monkeypatch.setattr(pipeline, "spectrum", lambda *a, **k: (spectra, Path("/tmp/spectrum-x")))
    monkeypatch.setattr(experiments, "run_specs", lambda m, s, P, names: {n: specs[n] for n in names} if (m, s) == (net, spectra) else None)
    done = []

    def fake_run(model, base, spec, P, **k):
        done.append((base, spec.name))
        return SimpleNamespace(top1=90.0, packed_top1=90.0, packed_bytes=12345, wall_s=60.0,
                               folder=Path(f"/tmp/finetune-{spec.name}"))

    monkeypatch.setattr(experiments, "run", fake_run)
    assert cli.main(["finetune", "--profile", "cpu", "W2A4", "order-reverse"]) == 0
    assert done == [("baseline_resnet20-x", "W2A4"), ("baseline_resnet20-x", "order-reverse")]
    out = capsys.readouterr().out
    assert "W2A4: test top-1 90.00%" in out and "12,345 bytes" in out and "/tmp/finetune-order-reverse" in out
