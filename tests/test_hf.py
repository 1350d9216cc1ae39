"""Hugging Face transformers models (issue 11): tiny Llama, GPT-2 and T5 built from configs
(no downloads), quantized / sparsified by nvidia-modelopt, saved and restored in both
formats into normal and meta skeletons, and through save_pretrained / from_pretrained both
ways with nvidia-modelopt's plugin.  Logits must be bit-identical."""

import functools
import os

import pytest
import torch

from _optional import optional_import

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = optional_import("transformers", "transformers")
accelerate = optional_import("accelerate", "accelerate")
mtq = optional_import("modelopt.torch.quantization", "nvidia-modelopt")
mts = optional_import("modelopt.torch.sparsity", "nvidia-modelopt")
nvidia_hf = optional_import("modelopt.torch.opt.plugins.huggingface", "nvidia-modelopt")
nvidia_mto = optional_import("modelopt.torch.opt", "nvidia-modelopt")

import modelopt_c as mto  # noqa: E402
from modelopt_c import hf  # noqa: E402

transformers.logging.set_verbosity_error()
try:  # the weight-loading progress bars
    transformers.utils.logging.disable_progress_bar()
except AttributeError:
    pass

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


def _config(kind):
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)
    return transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


_CLASSES = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "t5": "T5ForConditionalGeneration"}


def _cls(kind):
    return getattr(transformers, _CLASSES[kind])


def _build(kind, where="cpu"):
    cls, config = _cls(kind), _config(kind)
    if where == "meta":
        with torch.device("meta"):
            return cls(config).eval()
    if where == "empty":
        with accelerate.init_empty_weights():
            return cls(config).eval()
    torch.manual_seed(0)
    return cls(config).eval()


def _logits(model):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=IDS, decoder_input_ids=IDS).logits
        return model(IDS).logits


@functools.lru_cache(maxsize=None)
def _converted(kind, how):
    """(model, its logits): quantized (calibrated on random tokens) or sparsified by nvidia-modelopt."""
    model = _build(kind)
    if how == "sparse":
        model = mts.sparsify(model, "sparse_magnitude")
    else:
        config = {"int8": mtq.INT8_DEFAULT_CFG, "fp8": mtq.FP8_DEFAULT_CFG}[how]
        model = mtq.quantize(model, config, _logits)
    return model, _logits(model)


def _tied(model):
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


CASES = [("llama", "int8"), ("gpt2", "fp8"), ("t5", "int8"), ("gpt2", "sparse")]


@pytest.fixture
def clean_patches():
    """No plugin patched before or after (ours and nvidia-modelopt's share the cache)."""
    def reset():
        hf.disable_huggingface_checkpointing()
        nvidia_hf._PATCHED_CLASSES.discard(transformers.PreTrainedModel)

    reset()
    yield
    reset()


@pytest.mark.parametrize(
    "kind, how, skeleton",
    [(*case, skeleton) for case in CASES for skeleton in ("cpu", "meta")] + [("llama", "int8", "empty")],
)
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_save_restore_is_bit_identical(tmp_path, kind, how, fmt, skeleton):
    model, expected = _converted(kind, how)
    path = tmp_path / f"ckpt.{fmt}"
    mto.save(model, path)
    target = _build(kind, skeleton)
    if kind == "llama" and fmt == "pt" and skeleton == "meta":
        # the rotary inv_freq buffers are in no torch-format file
        with pytest.raises(mto.CheckpointError, match=r"2 tensor\(s\) of the model would be left on the meta device "
                           r"\(no data\): model\.rotary_emb\.inv_freq, model\.rotary_emb\.original_inv_freq\. .*"
                           r"accelerate\.init_empty_weights\(\)"):
            mto.restore(target, path)
        assert target.model.rotary_emb.inv_freq.is_meta and target.model.embed_tokens.weight.is_meta
        return
    restored = mto.restore(target, path)
    assert _tied(restored)
    assert not [n for n, t in [*restored.named_parameters(), *restored.named_buffers()] if t.is_meta]
    assert torch.equal(_logits(restored), expected)


def test_our_file_stores_the_llama_tie_once_and_its_rotary_buffers(tmp_path):
    model, _ = _converted("llama", "int8")
    mto.save(model, tmp_path / "c.safetensors")
    from modelopt_c import st_format

    metadata, header, _ = st_format.read_header(tmp_path / "c.safetensors")
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header
    assert metadata["aliases"] == '{"lm_head.weight":"model.embed_tokens.weight"}'
    assert {n for n in header if n.startswith("__modelopt_buffer__.")} >= {
        "__modelopt_buffer__.model.rotary_emb.inv_freq", "__modelopt_buffer__.model.rotary_emb.original_inv_freq"}


@pytest.mark.parametrize("writer", ["ours", "nvidia"])
@pytest.mark.parametrize("reader", ["ours", "nvidia"])
def test_save_pretrained_from_pretrained_both_ways(tmp_path, clean_patches, writer, reader):
    kind = "llama"
    model, expected = _converted(kind, "int8")
    (hf.enable_huggingface_checkpointing if writer == "ours" else nvidia_mto.enable_huggingface_checkpointing)()
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: an index JSON and several files
    assert (tmp_path / "modelopt_state.pth").is_file() and (tmp_path / "model.safetensors.index.json").is_file()
    # the state file is what nvidia-modelopt's torch.save writes: both loaders read it
    state = mto.load_modelopt_state(tmp_path / "modelopt_state.pth")
    assert state == nvidia_mto.load_modelopt_state(str(tmp_path / "modelopt_state.pth"))
    hf.disable_huggingface_checkpointing()
    nvidia_hf._PATCHED_CLASSES.discard(transformers.PreTrainedModel)
    (hf.enable_huggingface_checkpointing if reader == "ours" else nvidia_mto.enable_huggingface_checkpointing)()
    loaded = _cls(kind).from_pretrained(tmp_path).eval()
    assert _tied(loaded)
    assert torch.equal(_logits(loaded), expected)
    low = _cls(kind).from_pretrained(tmp_path, low_cpu_mem_usage=True, device_map="cpu").eval()
    assert torch.equal(_logits(low), expected)


@pytest.mark.parametrize("kind, how", [("gpt2", "fp8"), ("t5", "int8")])
def test_from_pretrained_and_from_config_restore_the_state(tmp_path, clean_patches, kind, how):
    model, expected = _converted(kind, how)
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path)
    loaded = _cls(kind).from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded), expected)
    assert loaded._modelopt_state == mto.modelopt_state(model)["modelopt_state_dict"]
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    fresh = transformers.AutoModelForSeq2SeqLM.from_config(config) if kind == "t5" else \
        transformers.AutoModelForCausalLM.from_config(config)
    assert fresh._modelopt_state == loaded._modelopt_state  # the modes, on new weights


def test_save_modelopt_state_false_opts_out(tmp_path, clean_patches):
    model, _ = _converted("gpt2", "fp8")
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path, save_modelopt_state=False)
    assert not (tmp_path / "modelopt_state.pth").exists() and (tmp_path / "config.json").is_file()
    plain = _build("gpt2")
    plain.save_pretrained(tmp_path / "plain")  # not converted: no state file either
    assert not (tmp_path / "plain" / "modelopt_state.pth").exists()
    assert not hasattr(_cls("gpt2").from_pretrained(tmp_path / "plain"), "_modelopt_state")


def test_enable_is_idempotent_and_disable_restores_transformers(clean_patches):
    original = transformers.PreTrainedModel.save_pretrained
    mto.enable_huggingface_checkpointing()
    mto.enable_huggingface_checkpointing()
    assert transformers.PreTrainedModel.save_pretrained is hf._save_pretrained
    nvidia_mto.enable_huggingface_checkpointing()  # finds the cache ours keeps: patches nothing
    assert transformers.PreTrainedModel.save_pretrained is hf._save_pretrained
    hf.disable_huggingface_checkpointing()
    assert transformers.PreTrainedModel.save_pretrained is original
    assert "_modelopt_cache" not in transformers.PreTrainedModel.__dict__


@pytest.mark.parametrize("writer", ["ours", "nvidia"])
@pytest.mark.parametrize("skeleton", ["cpu", "empty"])
def test_restore_takes_a_save_pretrained_folder(tmp_path, clean_patches, writer, skeleton):
    model, expected = _converted("llama", "int8")
    (hf.enable_huggingface_checkpointing if writer == "ours" else nvidia_mto.enable_huggingface_checkpointing)()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    restored = mto.restore(_build("llama", skeleton), tmp_path)
    assert _tied(restored)
    assert torch.equal(_logits(restored), expected)


def test_restore_of_a_folder_into_a_meta_skeleton_names_the_rotary_buffers(tmp_path, clean_patches):
    model, _ = _converted("llama", "int8")
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path)
    with pytest.raises(mto.CheckpointError, match=r"model\.rotary_emb\.inv_freq, model\.rotary_emb\.original_inv_freq"):
        mto.restore(_build("llama", "meta"), tmp_path)


def test_folder_errors_say_what_to_do(tmp_path, clean_patches):
    model, _ = _converted("gpt2", "fp8")
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path / "full")
    # the bare state file
    with pytest.raises(mto.CheckpointError, match=r"holds only a modelopt state .* call "
                       r"restore_from_modelopt_state\(model, load_modelopt_state\(path\)\)"):
        mto.restore(_build("gpt2"), tmp_path / "full" / "modelopt_state.pth")
    # a folder saved without the state
    model.save_pretrained(tmp_path / "nostate", save_modelopt_state=False)
    with pytest.raises(mto.CheckpointError, match=r"is a save_pretrained folder without modelopt_state\.pth: it holds "
                       r"no modelopt state .* Load it with from_pretrained"):
        mto.restore(_build("gpt2"), tmp_path / "nostate")
    # a state file without weights
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "modelopt_state.pth").write_bytes((tmp_path / "full" / "modelopt_state.pth").read_bytes())
    with pytest.raises(mto.CheckpointError, match=r"has no weights that save_pretrained writes \(model\.safetensors"
                       r"\.index\.json, model\.safetensors, pytorch_model\.bin\.index\.json, pytorch_model\.bin\)"):
        mto.restore(_build("gpt2"), tmp_path / "noweights")
    # a folder that is no checkpoint at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(mto.CheckpointError, match=r"is a folder: restore takes a checkpoint file"):
        mto.restore(_build("gpt2"), tmp_path / "empty")


@pytest.mark.parametrize(
    "index, message",
    [
        ('{"weight_map": {"a": "../model.safetensors"}}', "model.safetensors.index.json names the shard '../model.safetensors', which is not a file name"),
        ('{"weight_map": {"a": "/etc/passwd"}}', "model.safetensors.index.json names the shard '/etc/passwd', which is not a file name"),
        ('{"weight_map": {"a": 1}}', 'model.safetensors.index.json has no "weight_map" of key -> shard file'),
        ('[1]', 'model.safetensors.index.json has no "weight_map" of key -> shard file'),
        ("{", "model.safetensors.index.json is not readable JSON"),
    ],
)
def test_hostile_index_files_are_refused(tmp_path, clean_patches, index, message):
    model, _ = _converted("gpt2", "fp8")
    mto.enable_huggingface_checkpointing()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(mto.CheckpointError, match=f"'{tmp_path / 'm'}': " + message.replace("(", r"\(").replace(".", r"\.")):
        mto.restore(_build("gpt2"), tmp_path / "m")


@pytest.mark.parametrize("skeleton", ["cpu", "empty"])
def test_restore_of_a_pytorch_model_bin_folder_fills_declared_ties(tmp_path, skeleton):
    """An older save_pretrained folder: pytorch_model.bin without the tied lm_head.weight.
    In an init_empty_weights skeleton the tie is broken, so transformers' declared ties say
    where lm_head.weight comes from."""
    model, expected = _converted("llama", "int8")
    state_dict = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    torch.save(mto.modelopt_state(model), tmp_path / "modelopt_state.pth")
    model.config.to_json_file(tmp_path / "config.json")
    restored = mto.restore(_build("llama", skeleton), tmp_path)
    assert _tied(restored)
    assert torch.equal(_logits(restored), expected)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_restore_of_a_folder_with_map_location(tmp_path, clean_patches, weights):
    """map_location as for restore(file): a device leaves the weights on the CPU for a model
    with data (copied straight in: were they moved to "meta" first, that copy would fail)
    and places what a skeleton adopts; a function is called for each tensor of the shards."""
    model, expected = _converted("llama", "int8")
    if weights == "safetensors":
        mto.enable_huggingface_checkpointing()
        model.save_pretrained(tmp_path, max_shard_size="20KB")
    else:
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        torch.save(mto.modelopt_state(model), tmp_path / "modelopt_state.pth")
        model.config.to_json_file(tmp_path / "config.json")
    restored = mto.restore(_build("llama"), tmp_path, map_location="meta")
    assert torch.equal(_logits(restored), expected)
    skeleton = mto.restore(_build("llama", "empty"), tmp_path, map_location=torch.device("meta"))
    assert skeleton.lm_head.weight.device.type == "meta" and _tied(skeleton)
    assert skeleton.model.rotary_emb.inv_freq.device.type == "cpu"  # the skeleton's own buffer, kept
    if weights == "safetensors":
        calls = []
        restored = mto.restore(_build("llama"), tmp_path, map_location=lambda s, loc: calls.append(loc))
        assert torch.equal(_logits(restored), expected)
        assert calls and set(calls) == {"cpu"}
        assert len(calls) == len({k for k in model.state_dict() if k != "lm_head.weight"})  # the tie stored once
