"""Models: shapes and parameter counts, ``get`` and its weights handling, blocks at both granularities."""
from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from torch import nn

import hawqlib.models as M
from hawqlib.blocks import quant_blocks
from hawqlib.models import registry
from hawqlib.models.squeezenext import ConvBNReLU

QUANT = (nn.Conv2d, nn.Linear)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (our choice for tests): on oversubscribed cores two OpenMP threads run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def imagenet_models():
    torch.manual_seed(0)
    return {"resnet50": M.get("resnet50").eval(), "inception_v3": M.get("inception_v3").eval(),
            "squeezenext": M.get("squeezenext").eval()}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to download fails the test loudly."""
    def refuse(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import urllib.request
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point torch's hub cache and the home folder at empty temporary folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HAWQ_WEIGHTS", raising=False)
    return tmp_path


# --------------------------------------------------------------------------- shapes and counts

def test_resnet20_shape_and_count():
    m = M.get("resnet20").eval()
    assert n_params(m) == 269_722
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert M.get("resnet20", num_classes=100).fc.out_features == 100


@pytest.mark.parametrize("name,count", [
    ("sqnxt23_w1", 724_056), ("sqnxt23_w3d2", 1_511_824), ("sqnxt23_w2", 2_583_752),
    ("sqnxt23v5_w1", 921_816), ("sqnxt23v5_w3d2", 1_953_616), ("sqnxt23v5_w2", 3_366_344)])
def test_squeezenext_variant_counts(name, count):
    assert n_params(M.get(name)) == count


def test_squeezenext_paper_choice_and_aliases(imagenet_models):
    m = imagenet_models["squeezenext"]
    assert (m.width, m.blocks_per_stage) == (2.0, (6, 6, 8, 1))          # 2.0-SqNxt-23
    assert n_params(m) == 2_583_752
    assert sum(x.weight.numel() for x in m.modules() if isinstance(x, QUANT)) == 2_548_096
    v5 = M.get("1.0-SqNxt-23v5")
    assert (v5.width, v5.blocks_per_stage) == (1.0, (2, 4, 14, 1))
    custom = M.get("squeezenext", width=1.0, blocks=(1, 1, 1, 1), num_classes=7).eval()
    assert custom(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    # 23 blocks of depth: stem + 21 blocks + final conv (+ classifier)
    assert sum(isinstance(x, M.SqueezeNextBlock) for x in m.modules()) == 21


def test_squeezenext_forward_and_residual_structure(imagenet_models):
    m = imagenet_models["squeezenext"]
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
        assert out.shape == (2, 1000)
        # channels_last gives the same function
        out_cl = m(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
        assert out_cl.shape == (2, 1000)
    first = m.stage1[0]
    assert isinstance(first.shortcut, ConvBNReLU)                  # 128 -> 64 channels
    assert isinstance(m.stage1[1].shortcut, nn.Identity)
    assert m.stage2[0].squeeze1.conv.stride == (2, 2) and m.stage2[0].shortcut.conv.stride == (2, 2)


def test_squeezenext_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        M.squeezenext(depth="99")
    with pytest.raises(ValueError, match="blocks"):
        M.squeezenext(blocks=(1, 2))
    with pytest.raises(ValueError, match="width"):
        M.squeezenext(width=0)


def test_resnet50_shape_and_count(imagenet_models):
    m = imagenet_models["resnet50"]
    assert n_params(m) == 25_557_032
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_inception_v3_shape_count_and_aux(imagenet_models):
    m = imagenet_models["inception_v3"]
    assert n_params(m) == 23_834_568 and m.AuxLogits is None and not m.transform_input
    with torch.no_grad():
        assert m(torch.randn(1, 3, 75, 75)).shape == (1, 1000)
        # without the auxiliary head, training mode returns a plain tensor a loss can take
        out = m.train()(torch.randn(2, 3, 75, 75))
    m.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1000)
    with torch.device("meta"):                       # counting needs no initialisation
        assert n_params(M.get("inception_v3", aux_logits=True)) == 27_161_264
        assert M.get("inception_v3", num_classes=5).fc.out_features == 5


# --------------------------------------------------------------------------- get()

def test_get_names_and_errors():
    assert {"resnet20", "resnet50", "inception_v3", "squeezenext"} <= set(M.names())
    with pytest.raises(ValueError, match="valid names: resnet20"):
        M.get("resnet18")
    with pytest.raises(TypeError, match="accepts aux_logits"):
        M.get("inception_v3", width=2)
    with pytest.raises(TypeError, match="weights must be"):
        M.get("resnet20", weights=True)
    with pytest.raises(ValueError, match="num_classes"):
        M.get("resnet20", num_classes=0)
    with pytest.raises(ValueError, match="1000 classes"):
        M.get("resnet50", num_classes=10, weights="pretrained")


@pytest.mark.parametrize("name,needle", [
    ("resnet50", "resnet50-0676ba61.pth"), ("inception_v3", "inception_v3_google-0cc3c7bd.pth"),
    ("squeezenext", "pytorchcv"), ("sqnxt23v5_w1", "sqnxt23v5_w1"), ("resnet20", "python -m hawqlib train")])
def test_pretrained_absent_is_a_clear_error(empty_caches, name, needle):
    with pytest.raises(M.WeightsNotFoundError) as err:
        M.get(name, weights="pretrained")
    msg = str(err.value)
    assert needle in msg
    if name != "resnet20":
        assert str(empty_caches / "torch" / "hub" / "checkpoints") in msg     # where it looked
        assert "Nothing is downloaded" in msg


def test_unknown_weights_name_and_missing_path(empty_caches):
    with pytest.raises(ValueError, match="IMAGENET1K_V2"):
        M.get("inception_v3", weights="IMAGENET1K_V2")
    with pytest.raises(M.WeightsNotFoundError, match="no weights file"):
        M.get("resnet20", weights=str(empty_caches / "nope.pt"))


def test_pretrained_torchvision_file_found_and_checked(imagenet_models, empty_caches, monkeypatch):
    ckpt = empty_caches / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    src = imagenet_models["inception_v3"]
    with torch.device("meta"):
        aux = M.get("inception_v3", aux_logits=True).AuxLogits.state_dict()
    published = {**src.state_dict(), **{f"AuxLogits.{k}": torch.zeros(v.shape, dtype=v.dtype) for k, v in aux.items()}}
    torch.save(published, ckpt / "inception_v3_google-0cc3c7bd.pth")   # as torchvision's file: with the aux head
    # the name promises a SHA-256 prefix this file does not have: refused as corrupt
    with pytest.raises(M.WeightsError, match="corrupt or not the published file"):
        M.get("inception_v3", weights="pretrained")
    monkeypatch.setattr(registry, "_verify_hash", lambda path, algorithm: None)
    m = M.get("inception_v3", weights="pretrained")
    assert m.transform_input and m.AuxLogits is None                     # torchvision's convention
    assert torch.equal(m.fc.weight, src.fc.weight)
    assert torch.equal(m.Mixed_7c.branch_pool.conv.weight, src.Mixed_7c.branch_pool.conv.weight)


def test_pretrained_squeezenext_port_file(empty_caches, monkeypatch):
    """A file of the public port (other key names, same order and shapes) in HAWQ_WEIGHTS loads by position."""
    monkeypatch.setenv("HAWQ_WEIGHTS", str(empty_caches / "w"))
    (empty_caches / "w").mkdir()
    src = M.get("sqnxt23_w1")
    port = {f"features.t{i:03d}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(src.state_dict().items())}
    tmp = empty_caches / "w" / "tmp.pth"
    torch.save(port, tmp)
    sha1 = hashlib.sha1(tmp.read_bytes()).hexdigest()[:8]
    shutil.move(tmp, empty_caches / "w" / f"sqnxt23_w1-4000-{sha1}.pth")
    m = M.get("squeezenext", width=1.0, weights="pretrained")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
    # another variant's port file is refused, by count and shape
    with pytest.raises(ValueError, match="another variant"):
        M.load_pytorchcv_state_dict(M.get("sqnxt23v5_w1"), port)


def test_weights_of_another_architecture_refused(tmp_path):
    path = tmp_path / "r20.pt"
    torch.save(M.get("resnet20").state_dict(), path)
    with pytest.raises(M.WeightsError, match="another architecture") as err:
        M.get("sqnxt23_w1", weights=path)
    assert "missing" in str(err.value) and "public SqueezeNext port" in str(err.value)
    with pytest.raises(M.WeightsError, match=r"shapes differ \(first: 'fc.weight'"):
        M.get("resnet20", num_classes=100, weights=path)
    # and the right one loads, from a path or a state dict
    m = M.get("resnet20", weights=path)
    assert torch.equal(m.fc.weight, torch.load(path)["fc.weight"])
    sd = {"module." + k: v for k, v in m.state_dict().items()}       # a DataParallel state dict
    m2 = M.get("resnet20", weights=sd)
    assert torch.equal(m2.conv1.weight, m.conv1.weight) and m2.conv1.weight.requires_grad
    with torch.no_grad():
        m2.conv1.weight.zero_()                                      # a copy, not a view of m's weights
    assert m.conv1.weight.abs().sum() > 0


def test_unreadable_and_wrong_kind_of_file_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(M.WeightsError, match="not a readable weights file"):
        M.get("resnet20", weights=bad)
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(M.WeightsError, match="not a state dict"):
        M.get("resnet20", weights=lst)
    good = tmp_path / "good.pt"
    torch.save(M.get("resnet20").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(M.WeightsError, match="not a readable"):
        M.get("resnet20", weights=truncated)


# --------------------------------------------------------------------------- blocks

@pytest.mark.parametrize("name,n_layer,n_residual", [
    ("resnet20", 20, 11), ("squeezenext", 112, 24), ("resnet50", 54, 18), ("inception_v3", 95, 17)])
def test_blocks_at_both_granularities(imagenet_models, name, n_layer, n_residual):
    m = imagenet_models.get(name) or M.get(name)
    weights = {id(x.weight) for x in m.modules() if isinstance(x, QUANT)}
    for gran, n in (("layer", n_layer), ("residual", n_residual)):
        blocks = quant_blocks(m, gran)
        assert len(blocks) == n
        covered = [id(p) for b in blocks for p in b.params]
        assert len(covered) == len(set(covered)) and set(covered) == weights    # each weight in one block
        for b in blocks:                                                       # names resolve for swapping
            for mn in b.module_names:
                assert isinstance(m.get_submodule(mn), QUANT)
    names = [b.name for b in quant_blocks(m, "residual")]
    expected = {"resnet20": "layer1.0", "squeezenext": "stage1.0", "resnet50": "layer1.0",
                "inception_v3": "Mixed_5b"}[name]
    assert expected in names and names[-1] == "fc"


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("squeezenext", 64), ("resnet50", 64), ("inception_v3", 75)])
def test_quantization_module_swapping(imagenet_models, name, size):
    """hawqlib.quant swaps every weight layer of every model, at both granularities; 8 bits stay close to FP32."""
    from hawqlib.quant import BitConfig, QuantConv2d, QuantLinear, quantize_model

    m = (imagenet_models.get(name) or M.get(name)).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = m(x)
    n_weights = sum(isinstance(x, QUANT) for x in m.modules())
    for gran in ("layer", "residual"):
        q = quantize_model(m, BitConfig.uniform(m, 8, granularity=gran)).eval()
        assert sum(isinstance(x, (QuantConv2d, QuantLinear)) for x in q.modules()) == n_weights
        with torch.no_grad():
            out = q(x)
        assert out.shape == ref.shape and float((out - ref).norm() / ref.norm()) < 0.15
