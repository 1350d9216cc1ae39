"""Complete meta-device restores (issue 11), on plain torch models: non-persistent buffers
in the safetensors format, tied tensors kept tied and stored once, a clear error for what
a restore would leave on meta.  The transformers models are in test_hf.py."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

import modelopt_c as mto
from modelopt_c import _runtime, st_format


class Tied(nn.Module):
    """An embedding tied to the output layer, and a non-persistent buffer the forward uses."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(1.0, 9.0), persistent=False)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)) * self.scale)


class OwnLoading(Tied):
    """The same with a module that loads itself: restore goes through torch's load_state_dict."""

    def __init__(self):
        super().__init__()

        def hook(*args, **kwargs):
            return None

        self.body.register_load_state_dict_pre_hook(hook)


IDS = torch.tensor([[1, 2, 3, 15], [0, 4, 9, 7]])


def _source(cls):
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():
        model.scale.mul_(0.5)  # not what a fresh model computes: proves the file's value is used
    return mto.apply_mode(model, ["t_replace", ("t_sparse", {"sparsity": 0.5})])


def _meta(cls):
    with torch.device("meta"):
        return cls()


def _on_meta(model):
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


@pytest.mark.parametrize("cls", [Tied, OwnLoading])
@pytest.mark.parametrize("skeleton", ["normal", "meta"])
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_ties_are_kept_by_every_restore(tmp_path, cls, skeleton, fmt):
    model = _source(cls)
    path = tmp_path / f"c.{'pt' if fmt == 'torch' else 'safetensors'}"
    mto.save(model, path)
    target = cls() if skeleton == "normal" else _meta(cls)
    if skeleton == "meta" and fmt == "torch":
        # the buffer is in no torch-format checkpoint: the model keeps its own after a warning
        with pytest.warns(UserWarning, match=r"1 tensor\(s\) of the model are left on the meta device"):
            restored = mto.restore(target, path, on_meta="warn")
        restored.scale = model.scale.clone()
    else:
        restored = mto.restore(target, path)
    if skeleton == "normal":  # a model with data keeps its own non-persistent buffers
        assert torch.equal(restored.scale, torch.arange(1.0, 9.0))
        restored.scale = model.scale.clone()
    assert restored.head.weight is restored.embed.weight
    assert _on_meta(restored) == []
    assert torch.equal(restored(IDS), model(IDS))


def test_meta_restore_of_safetensors_fills_non_persistent_buffers(tmp_path):
    model = _source(Tied)
    mto.save(model, tmp_path / "c.safetensors")
    restored = mto.restore(_meta(Tied), tmp_path / "c.safetensors")
    assert torch.equal(restored.scale, model.scale) and not restored.scale.is_meta
    assert "scale" in restored._non_persistent_buffers_set and "scale" not in restored.state_dict()


def test_a_model_with_data_keeps_its_own_non_persistent_buffers(tmp_path):
    model = _source(Tied)
    mto.save(model, tmp_path / "c.safetensors")
    fresh = Tied()
    restored = mto.restore(fresh, tmp_path / "c.safetensors")
    assert torch.equal(restored.scale, torch.arange(1.0, 9.0))


def test_safetensors_file_stores_ties_once_and_buffers_under_their_prefix(tmp_path):
    model = _source(Tied)
    path = tmp_path / "c.safetensors"
    mto.save(model, path)
    metadata, header, _ = st_format.read_header(path)
    assert metadata["format_version"] == "2"
    assert json.loads(metadata["aliases"]) == {"head.weight": "embed.weight"}
    assert "head.weight" not in header and "embed.weight" in header
    assert header["__modelopt_buffer__.scale"][:2] == ("F32", (8,))
    # any safetensors reader: the weights, the tie left out (as save_pretrained does), clearly named extras
    from safetensors.torch import load_file

    plain = load_file(str(path))
    assert torch.equal(plain["__modelopt_buffer__.scale"], model.scale)
    assert set(plain) == set(model.state_dict()) - {"head.weight"} | {"__modelopt_buffer__.scale"}
    # ours: the tie is one tensor again, the buffers only on request
    _, state_dict = st_format.load_file(path)
    assert state_dict.keys() == model.state_dict().keys()
    assert state_dict["head.weight"] is state_dict["embed.weight"]
    _, with_buffers = st_format.load_file(path, buffers=True)
    assert torch.equal(with_buffers["__modelopt_buffer__.scale"], model.scale)


def test_a_file_without_ties_or_buffers_stays_version_1(tmp_path, net):
    path = tmp_path / "c.safetensors"
    mto.save(mto.apply_mode(net, "t_replace"), path)
    metadata, _, _ = st_format.read_header(path)
    assert metadata["format_version"] == "1" and "aliases" not in metadata


@pytest.mark.parametrize("cls", [Tied, OwnLoading])
def test_torch_format_into_meta_raises_naming_what_stays_on_meta(tmp_path, cls):
    model = _source(cls)
    mto.save(model, tmp_path / "c.pt")
    target = _meta(cls)
    with pytest.raises(mto.CheckpointError) as info:
        mto.restore(target, tmp_path / "c.pt")
    text = str(info.value)
    assert f"checkpoint {str(tmp_path / 'c.pt')!r}: 1 tensor(s) of the model would be left on the meta device" in text
    assert "(no data): scale." in text
    assert "accelerate.init_empty_weights()" in text and "the .safetensors format" in text
    assert "on_meta='warn'" in text and text.endswith("Nothing was loaded.")
    # rolled back: the skeleton is as it was
    assert type(target.body) is nn.Linear and target.embed.weight.is_meta and target.head.weight is target.embed.weight


def test_the_list_of_meta_tensors_is_shortened(tmp_path):
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    for i, layer in enumerate(big):
        layer.register_buffer(f"np{i}", torch.ones(2), persistent=False)
        layer.register_buffer(f"np{i}b", torch.ones(2), persistent=False)
    mto.save(mto.apply_mode(big, "t_replace"), tmp_path / "c.pt")
    with torch.device("meta"):
        skeleton = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
        for i, layer in enumerate(skeleton):
            layer.register_buffer(f"np{i}", torch.ones(2), persistent=False)
            layer.register_buffer(f"np{i}b", torch.ones(2), persistent=False)
    with pytest.raises(mto.CheckpointError, match=r"8 tensor\(s\) .*: 0\.np0, 0\.np0b, 1\.np1, 1\.np1b, 2\.np2, \.\.\. \(8 in all\)\."):
        mto.restore(skeleton, tmp_path / "c.pt")


def test_on_meta_must_be_raise_or_warn(tmp_path):
    mto.save(_source(Tied), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"on_meta must be 'raise' or 'warn', not 'ignore'\."):
        mto.restore(Tied(), tmp_path / "c.pt", on_meta="ignore")


def test_accelerate_style_skeleton_gets_its_ties_back_from_the_file(tmp_path):
    """init_empty_weights re-creates each parameter, so the skeleton's tie is broken; the
    file (one storage / an alias) says it was one tensor."""
    model = _source(Tied)
    for fmt in ("pt", "safetensors"):
        mto.save(model, tmp_path / f"c.{fmt}")
        skeleton = _meta(Tied)
        skeleton.head.weight = nn.Parameter(torch.empty(16, 8, device="meta"))  # untied, as accelerate leaves it
        skeleton.scale = torch.arange(1.0, 9.0) * 0.5
        restored = mto.restore(skeleton, tmp_path / f"c.{fmt}")
        assert restored.head.weight is restored.embed.weight
        assert torch.equal(restored(IDS), model(IDS))


def test_independent_meta_slots_never_share_a_file_tensor_by_accident():
    """Two meta slots given the same file tensor are tied on purpose only: two different
    file tensors stay two tensors; the plan merges by the file's memory, not by value."""
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    plan = [("x", torch.empty(2, 2, device="meta"), a, _runtime.ASSIGN), ("y", torch.empty(2, 2, device="meta"), b, _runtime.ASSIGN)]
    merged = _runtime._tie_assigns(plan, {})
    assert [entry[0] for entry in merged] == ["x", "y"]
    plan[1] = ("y", plan[1][1], a, _runtime.ASSIGN)
    assert [entry[0] for entry in _runtime._tie_assigns(plan, {})] == [("x", "y")]


def test_reserved_buffer_prefix_cannot_be_a_state_dict_key(tmp_path):
    with pytest.raises(mto.CheckpointError, match=r"state_dict key '__modelopt_buffer__\.x' uses the reserved prefix '__modelopt_buffer__\.'"):
        st_format.save_file(tmp_path / "c.safetensors", {"__modelopt_buffer__.x": torch.ones(1)}, mto.modelopt_state(nn.Linear(1, 1)))


@pytest.mark.parametrize(
    "aliases, message",
    [
        ("not json", "the metadata's 'aliases' is not JSON"),
        ('["a"]', "the metadata's 'aliases' is not an object of name -> name"),
        ('{"w": 3}', "the metadata's 'aliases' is not an object of name -> name"),
        ('{"w": "w"}', "alias 'w' names a tensor the file also stores"),
        ('{"v": "nope"}', "alias 'v' points to 'nope', which the file does not store"),
        ('{"__modelopt_buffer__.v": "w"}', "alias '__modelopt_buffer__.v' names a tensor the file also stores"),
    ],
)
def test_bad_aliases_are_refused_by_name(tmp_path, aliases, message):
    import base64

    from modelopt_c import _conversion

    state = mto.modelopt_state(mto.apply_mode(nn.Linear(1, 1), "t_replace"))
    payload = base64.b64encode(bytes(_conversion.encode_state(state, []))).decode()
    path = tmp_path / "bad.safetensors"
    meta = {"format": "modelopt_c", "format_version": "2", "modelopt_state": payload, "aliases": aliases}
    _conversion.st_write(path, {"w": torch.ones(1)}, meta)
    with pytest.raises(mto.CheckpointError, match=f"^{str(path)}: " + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        st_format.load_file(path)


def test_bare_modelopt_state_file_names_restore_from_modelopt_state(tmp_path):
    model = _source(Tied)
    torch.save(mto.modelopt_state(model), tmp_path / "modelopt_state.pth")
    with pytest.raises(mto.CheckpointError) as info:
        mto.restore(Tied(), tmp_path / "modelopt_state.pth")
    assert str(info.value) == (
        f"{str(tmp_path / 'modelopt_state.pth')!r} holds only a modelopt state (no weights), as save_pretrained "
        "writes it (modelopt_state.pth) or torch.save(modelopt_state(model)) does: call "
        "restore_from_modelopt_state(model, load_modelopt_state(path)) for it, then load the weights "
        "(or restore(model, folder) for a whole save_pretrained folder)."
    )
    restored = mto.restore_from_modelopt_state(Tied(), mto.load_modelopt_state(tmp_path / "modelopt_state.pth"))
    assert restored._modelopt_state == mto.modelopt_state(model)["modelopt_state_dict"]


def test_warn_leaves_the_restore_loaded(tmp_path):
    model = _source(Tied)
    mto.save(model, tmp_path / "c.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = mto.restore(_meta(Tied), tmp_path / "c.pt", on_meta="warn")
    assert any("the model cannot run until they are set" in str(w.message) for w in caught)
    assert _on_meta(restored) == ["scale"]
    assert torch.equal(restored.body.weight, model.body.weight)


def test_cli_inspect_and_convert_of_a_version_2_file(tmp_path):
    import io
    from contextlib import redirect_stdout

    from modelopt_c import cli

    model = _source(Tied)
    mto.save(model, tmp_path / "c.safetensors")
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["inspect", "--json", str(tmp_path / "c.safetensors")]) == 0
    info = json.loads(out.getvalue())
    assert info["format_version"] == "2"
    assert info["tensors"]["count"] == len(model.state_dict()) - 1  # the tie stored once
    assert info["buffer_tensors"]["count"] == 1 and info["state_tensors"]["count"] == 0
    # to the torch format and back: the tie survives (one storage, then an alias again)
    with redirect_stdout(io.StringIO()):
        assert cli.main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "c.pt")]) == 0
        assert cli.main(["convert", str(tmp_path / "c.pt"), str(tmp_path / "d.safetensors")]) == 0
    restored = mto.restore(Tied(), tmp_path / "c.pt")
    assert restored.head.weight is restored.embed.weight and torch.equal(restored.embed.weight, model.embed.weight)
    metadata, header, _ = st_format.read_header(tmp_path / "d.safetensors")
    assert json.loads(metadata["aliases"]) == {"head.weight": "embed.weight"} and "head.weight" not in header


def test_restoring_into_a_converted_model_says_to_use_a_fresh_one(tmp_path):
    model = _source(Tied)
    mto.save(model, tmp_path / "c.pt")
    for call in (lambda: mto.restore(model, tmp_path / "c.pt"),
                 lambda: mto.restore_from_modelopt_state(model, mto.modelopt_state(model))):
        with pytest.raises(AssertionError) as info:
            call()
        assert str(info.value) == "Model already has modelopt state!"  # nvidia-modelopt's text, unchanged
        assert info.value.__notes__ == [
            "restore() and restore_from_modelopt_state() replay the saved modes themselves: restore into a "
            "freshly built model (e.g. MyModel() or AutoModel.from_config(config)), not one already converted."
        ]
