"""The named runs of the ResNet20 table and the ablation, and the command that computes them."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hawqlib.repro import baseline as baseline_step
from hawqlib.repro import cli
from hawqlib.repro import experiments, pipeline, profiles
from hawqlib import size
from hawqlib.blocks import quant_blocks
from hawqlib.order import finetune_order
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
    return net, spectra, P, experiments.run_specs(net, spectra, P, _paper_names(P))


def _paper_names(P):
    """The runs whose bits need no stored artifact (all but the allocations beyond the paper)."""
    beyond = set(experiments.run_names(P, "sensitivity")) - {"hawq"}
    return [n for n in experiments.run_names(P) if n not in beyond]


def test_run_specs_name_every_row_of_the_table_and_the_ablation(cpu_specs):
    net, spectra, P, specs = cpu_specs
    assert list(specs) == _paper_names(P)
    assert experiments.run_names(P, "sensitivity") == ["hawq", "alloc-trace", "alloc-v3", "alloc-greedy",
                                                       "hawq-size-reverse"]
    with pytest.raises(ValueError, match="pass base="):
        experiments.run_specs(net, spectra, P, ["alloc-v3"])
    assert list(specs) == ["hawq", "hawq-strict", "W4A4", "W2A4", "alloc-reverse", "alloc-random", "order-reverse",
                           "order-random", "hawq+final", "hawq+lsq", "hawq+kd", "hawq@paper", "order-reverse@paper"]
    hawq = specs["hawq"]
    # the gap attempts: the headline run's bits and order, with fine-tuning settings replaced
    for n, schedule in P["finetune"]["attempts"].items():
        assert specs[n].bit_config is hawq.bit_config and specs[n].order == hawq.order
        assert specs[n].schedule == schedule and not specs[n].direct
    assert all(not specs[n].schedule for n in experiments.run_names(P, "table") + experiments.run_names(P, "ablation"))
    # epochs: stages x epochs per stage, plus the final stage an attempt adds (and the direct rows train as long)
    F = P["finetune"]
    assert experiments.epochs(P, hawq) == experiments.epochs(P, specs["W4A4"]) == F["stages"] * F["epochs_per_stage"]
    assert experiments.epochs(P, specs["hawq+final"]) == experiments.epochs(P, hawq) + \
        P["finetune"]["attempts"]["hawq+final"]["final_epochs"]
    assert list(hawq.order) == [e.name for e in finetune_order(net, spectra, hawq.bit_config)]
    assert specs["order-reverse"].order == hawq.order[::-1]
    assert specs["order-reverse"].bit_config is hawq.bit_config
    assert specs["order-random"].order != hawq.order and sorted(specs["order-random"].order) == sorted(hawq.order)
    for w in (4, 2):
        d = specs[f"W{w}A4"]
        assert d.direct and d.order is None and set(d.bit_config.weights.values()) == {w}
    target = next(iter(P["allocation"]["targets"].values()))
    for n in ("hawq", "alloc-reverse", "alloc-random"):  # the headline budget: the weights' bits alone
        bc = specs[n].bit_config
        assert size.weight_compression(net, bc) >= target and bc.act_bits == P["allocation"]["act_bits"]
        assert sorted(specs[n].order) == sorted(b.name for b in quant_blocks(net, "layer"))
    assert specs["alloc-reverse"].bit_config.to_dict() != hawq.bit_config.to_dict()
    strict = specs["hawq-strict"].bit_config  # the same target over the whole model: fewer bits
    assert size.model_size_bytes(net, strict) <= size.model_size_bytes(net, None) / target
    assert size.model_size_bytes(net, hawq.bit_config) > size.model_size_bytes(net, None) / target
    assert size.weight_compression(net, strict) > size.weight_compression(net, hawq.bit_config)


def test_the_headline_budget_is_the_papers_weight_only_measure():
    for name in ("cpu", "paper", "smoke"):
        assert profiles.get(name)["allocation"]["measure"] == "weights"


def test_seeds_by_run_name():
    P = profiles.get("cpu")
    assert experiments.seeds(P, "hawq") == [0, 1, 2] == experiments.seeds(P, "order-reverse")
    assert experiments.seeds(P, "alloc-reverse") == [0, 1, 2] == experiments.seeds(P, "hawq+kd")
    assert experiments.seeds(P, "hawq+final") == [P["finetune"]["seed"]] == experiments.seeds(P, "hawq+lsq")
    assert experiments.seeds(P, "W2A4") == [P["finetune"]["seed"]] == experiments.seeds(P, "order-random")
    P["finetune"]["seeds"]["hawq"] = [0, "1"]
    with pytest.raises(ValueError, match=r"finetune.seeds\['hawq'\] must be a non-empty list of integers"):
        experiments.seeds(P, "hawq")


def test_run_names_groups_select_the_table_and_the_ablation():
    P = profiles.get("cpu")
    assert experiments.run_names(P, "table") == ["hawq", "hawq-strict", "W4A4", "W2A4"]
    assert experiments.run_names(P, "ablation") == ["hawq", "alloc-reverse", "alloc-random", "order-reverse",
                                                    "order-random"]
    with pytest.raises(ValueError, match=r"unknown group 'tabel'; valid: table, ablation"):
        experiments.run_names(P, "tabel")


def test_run_specs_builds_only_the_runs_asked_for(cpu_specs, monkeypatch):
    net, spectra, P, specs = cpu_specs
    policies = []
    real = experiments.allocation
    monkeypatch.setattr(experiments, "allocation",
                        lambda m, s, P, policy, measure: policies.append(policy) or real(m, s, P, policy, measure))
    some = experiments.run_specs(net, spectra, P, ["order-reverse", "W2A4"])
    assert list(some) == ["order-reverse", "W2A4"] and policies == ["hawq"]
    assert some["order-reverse"] == specs["order-reverse"] and some["W2A4"] == specs["W2A4"]
    assert experiments.run_specs(net, spectra, P, ["W4A4"])["W4A4"] == specs["W4A4"] and policies == ["hawq"]
    with pytest.raises(ValueError, match=r"unknown run\(s\) alloc-hawq for profile 'cpu'; valid: hawq, hawq-strict"):
        experiments.run_specs(net, spectra, P, ["hawq", "alloc-hawq"])


def test_finetune_settings_are_the_profiles_with_the_runs_own_and_the_seed(cpu_specs):
    net, spectra, P, specs = cpu_specs
    assert experiments.finetune_settings(P, specs["W2A4"]) == P["finetune"]
    # the seed replaces the schedule's; nothing else changes
    assert experiments.finetune_settings(P, specs["order-reverse"], 2) == {**P["finetune"], "seed": 2}
    kd = experiments.finetune_settings(P, specs["hawq+kd"], 1)
    assert kd == {**P["finetune"], **P["finetune"]["attempts"]["hawq+kd"], "seed": 1}
    long = experiments.finetune_settings(P, specs["hawq@paper"])
    assert long == {**P["finetune"], "stages": 8, "epochs_per_stage": 10, "seed": 0}


def test_finetune_command_rejects_an_unknown_run_before_loading_anything(monkeypatch):
    monkeypatch.setattr(baseline_step, "baseline", lambda *a, **k: pytest.fail("the baseline was loaded"))
    with pytest.raises(SystemExit, match=r"unknown run\(s\) W3A3 .*valid: hawq, hawq-strict, W4A4, W2A4, alloc-reverse"):
        cli.main(["finetune", "--profile", "smoke", "hawq", "W3A3"])


@pytest.mark.parametrize("bad", ["-1", "one"])
def test_seeds_must_be_whole_numbers(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--profile", "smoke", "--seeds", bad])
    assert "must be a whole number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["-1", "two"])
def test_threads_must_be_a_whole_number(bad, capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--profile", "smoke", "--threads", bad])
    assert "must be a whole number in 0.." in capsys.readouterr().err


def test_finetune_command_runs_the_named_rows_in_order(cpu_specs, monkeypatch, capsys):
    net, spectra, P, specs = cpu_specs
    monkeypatch.setattr(baseline_step, "baseline", lambda *a, **k: (net, {}, Path("/tmp/baseline_resnet20-x")))
    monkeypatch.setattr(pipeline, "spectrum", lambda *a, **k: (spectra, Path("/tmp/spectrum-x")))
    monkeypatch.setattr(experiments, "run_specs", lambda m, s, P, names, **kw: {n: specs[n] for n in names} if (m, s) == (net, spectra) else None)
    done = []

    def fake_finetuned(model, base, bit_config, order, cfg, *, provenance, **k):
        name = next(n for n, sp in specs.items() if sp.bit_config is bit_config and sp.direct == k["direct"]
                    and (sp.direct or list(sp.order) == order)
                    and experiments.finetune_settings(P, sp, cfg["seed"]) == cfg)
        done.append((base, name, cfg["seed"], provenance["spectrum"]))
        return SimpleNamespace(top1=90.0, packed_top1=90.0, packed_bytes=12345, wall_s=60.0,
                               folder=Path(f"/tmp/finetune-{name}"))

    monkeypatch.setattr(pipeline, "finetuned", fake_finetuned)
    assert cli.main(["finetune", "--profile", "cpu", "W2A4", "order-reverse"]) == 0
    b, s = "baseline_resnet20-x", "spectrum-x"
    # every run's first seed first, then the second seeds, ...
    assert done == [(b, "W2A4", 0, s), (b, "order-reverse", 0, s), (b, "order-reverse", 1, s),
                    (b, "order-reverse", 2, s)]
    out = capsys.readouterr().out
    assert "W2A4 (seed 0): test top-1 90.00%" in out and "12,345 bytes" in out and "/tmp/finetune-order-reverse" in out
    done.clear()
    assert cli.main(["finetune", "--profile", "cpu", "hawq", "--seeds", "4"]) == 0
    assert done == [(b, "hawq", 4, s)]
    done.clear()  # the gap attempts come after every seed of the table's and the ablation's runs
    assert cli.main(["finetune", "--profile", "cpu", "hawq+final", "hawq", "alloc-reverse"]) == 0
    assert [(n, seed) for _, n, seed, _ in done] == [("hawq", 0), ("alloc-reverse", 0), ("hawq", 1),
                                                      ("alloc-reverse", 1), ("hawq", 2), ("alloc-reverse", 2),
                                                      ("hawq+final", 0)]


def test_the_longer_schedules_repeat_a_run_with_only_its_schedule_replaced(cpu_specs):
    net, spectra, P, specs = cpu_specs
    longer = P["finetune"]["longer"]["paper"]
    assert longer["schedule"] == {k: profiles.get("paper")["finetune"][k] for k in ("stages", "epochs_per_stage")}
    assert experiments.run_names(P, "longer") == ["hawq", "hawq@paper", "order-reverse@paper"]
    for run in ("hawq", "order-reverse"):
        short, long = specs[run], specs[f"{run}@paper"]
        assert long.bit_config is short.bit_config and long.order == short.order and not long.direct
        assert long.schedule == longer["schedule"] and "8 stages of 10 epochs" in long.description
        assert experiments.epochs(P, long) == 80 and experiments.seeds(P, long.name) == [0, 1, 2]
    P2 = {**P, "finetune": {**P["finetune"], "longer": {"x": {"schedule": {"stages": 8}, "runs": ["W2A4"]}}}}
    with pytest.raises(ValueError, match=r"finetune.longer\['x'\] names run 'W2A4', which is not a staged run.*"
                                         r"valid: hawq, hawq-strict, alloc-reverse"):
        experiments.run_names(P2)


def test_an_attempt_must_change_real_fine_tuning_settings(cpu_specs):
    net, spectra, P, _ = cpu_specs
    for attempt, match in (({"final_epoch": 8}, r"sets \['final_epoch'\], which are not fine-tuning settings"),
                           ({"final_epochs": 0}, "changes nothing"), ({"seed": 3}, "not fine-tuning settings")):
        P2 = {**P, "finetune": {**P["finetune"], "attempts": {"hawq+x": attempt}}}
        with pytest.raises(ValueError, match=match):
            experiments.run_specs(net, spectra, P2, ["hawq"])


ART = Path(__file__).resolve().parents[1] / "data" / "artifacts"
PUBLISHED_ORDERS = {"finetune-f560640f5808": "omega", "finetune-66361cd8f29b": "reverse",
                    "finetune-c44dd479c7ec": "random"}


@pytest.mark.skipif(not all((ART / f / "manifest.json").exists() for f in PUBLISHED_ORDERS),
                    reason="the committed cpu fine-tuning artifacts are not in this checkout")
@pytest.mark.parametrize("folder", sorted(PUBLISHED_ORDERS))
def test_the_library_order_reproduces_each_published_row(folder):
    """order.finetune_order gives the order each committed row was fine-tuned in."""
    import json

    from hawqlib import hessian, quant
    from hawqlib.train import load_weights

    m = json.loads((ART / folder / "manifest.json").read_text())["params"]
    from hawqlib.repro import artifacts
    artifacts.verify(ART / m["base"])  # the manifest vouches for model.pt, which predates checkpoint digests
    net = load_weights(resnet20(), ART / m["base"] / "model.pt", require_digest=False).eval()
    spectra = hessian.load_spectra(ART / "spectrum-4ce2eddb926e" / "spectrum.json")
    bc = quant.BitConfig.from_dict(m["bit_config"])
    kind = PUBLISHED_ORDERS[folder]
    seed = profiles.get("cpu")["ablation"]["seed"]
    assert [e.name for e in finetune_order(net, spectra, bc, policy=kind, seed=seed)] == m["order"]
