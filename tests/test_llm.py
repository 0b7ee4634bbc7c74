"""aoti_rt.llm: transformers causal LMs as prefill/decode bundles (the ``aoti_rt[llm]`` extra).

Tiny models with random weights (a Llama and a Qwen3-MoE), quantized with torchao (int8, int4
with the CPU packing), exported and compiled once per module; each bundle's tokens are checked
against the same quantized model run eagerly, and its memory against one copy of the quantized
state. Skipped where transformers or torchao is not installed.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("torchao")

import transformers  # noqa: E402

import aoti_rt  # noqa: E402
from aoti_rt.llm import (LLM, MissingExtraError, UnsupportedModelError, export_llm,  # noqa: E402
                         load_llm)
from aoti_rt.llm.export import eager_step, state_bytes  # noqa: E402
from aoti_rt.llm.generate import generate_tokens  # noqa: E402
from aoti_rt.llm.quant import quantize  # noqa: E402

MAX_SEQ = 32
MAX_PREFILL = 8
GROUP = 32
PROMPT = list(range(3, 14))          # 11 tokens: a prefill of 8, then one of 3


def _config(family: str):
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        return transformers.LlamaConfig(intermediate_size=128, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(intermediate_size=128, head_dim=16, **common)
    return transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                       num_experts_per_tok=2, head_dim=16, **common)


def _eager(family: str, scheme: str, seed: int = 0, device: str = "cpu", dtype=torch.float32, **kwargs):
    """The model the bundle was exported from, quantized the same way, run eagerly."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(family), dtype=dtype, **kwargs)
    model.eval().requires_grad_(False).to(device)
    quantize(model, scheme, "cpu" if device == "cpu" else "cuda", GROUP)
    return model


#: the bundle the command line writes (``llm export --config``), which the API's tests use too
BY_CLI = ("qwen3", "int4")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Each (family, scheme) bundle compiled once per module; :data:`BY_CLI` through
    ``python -m aoti_rt llm export``, its progress text kept as ``get.cli_err``."""
    made: dict[tuple[str, str], object] = {}

    def get(family: str, scheme: str):
        key = (family, scheme)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{family}-{scheme}")
            path = root / "b.aoti"
            if key == BY_CLI:
                import contextlib
                import io

                from aoti_rt.cli import main

                _config(family).save_pretrained(root / "cfg")
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    rc = main(["llm", "export", "--config", str(root / "cfg"), str(path), "--max-seq-len",
                               str(MAX_SEQ), "--max-prefill", str(MAX_PREFILL), "--quantize", scheme,
                               "--group-size", str(GROUP)])
                assert rc == 0, err.getvalue()[-2000:]
                get.cli_err = err.getvalue()
                made[key] = path
            else:
                made[key] = export_llm(_config(family), path, max_seq_len=MAX_SEQ, max_prefill=MAX_PREFILL,
                                       quantize_weights=scheme, group_size=GROUP, progress=False)
        return made[key]
    return get


@pytest.mark.parametrize("family,scheme", [("llama", "int8"), ("llama", "int4"), ("qwen3_moe", "int8"),
                                           ("qwen3_moe", "int4"), ("qwen3", "int4")])
def test_tokens_equal_eager_and_one_copy(bundles, family, scheme):
    path = bundles(family, scheme)
    model = _eager(family, scheme)
    want = generate_tokens(eager_step(model, MAX_SEQ), PROMPT, max_seq_len=MAX_SEQ, max_prefill=MAX_PREFILL,
                           max_new_tokens=12)
    with load_llm(path) as lm:
        assert set(lm.model.methods) == {"prefill", "decode"}
        got = lm.generate(PROMPT, max_new_tokens=12, stop=[])
        assert got.tokens == want.tokens
        assert got.finish_reason == "length"
        # one copy of the quantized weights and one KV cache, for both methods
        wrapper = transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM(
            model, batch_size=1, max_cache_len=MAX_SEQ).model
        quantized = state_bytes(wrapper)
        held = aoti_rt.cache_stats(lm.model.device)["bytes_allocated"]
        man = lm.model.manifest
        assert f"{held / man.unique_weight_bytes():.2f}" == "1.00", (held, man.unique_weight_bytes())
        # at most the quantized model's own bytes (less: torchao's unused int8 zero points are
        # not in the graph, and equal tensors, the norms' ones, are stored once)
        assert 0.95 * quantized <= held <= 1.005 * quantized, (held, quantized)
        per_method = sum(man.per_method_bytes(m) for m in man.methods)
        assert per_method / man.unique_weight_bytes() > 1.9
        # the linear weights are stored quantized, not folded back to float
        dtypes = {c.dtype for m in man.methods.values() for c in m.constants if "parametrizations" in c.fqn}
        assert dtypes & {"int8", "uint8", "int32"}, dtypes
        # so are MoE experts: 3-D int8 (int4: two a byte) with a scale per row or group
        experts = {c.fqn.rsplit(".", 1)[1]: c.dtype for m in man.methods.values() for c in m.constants
                   if ".experts." in c.fqn}
        if family == "qwen3_moe":
            assert experts == {"gate_up_proj_qdata": "int8" if scheme == "int8" else "uint8",
                               "down_proj_qdata": "int8" if scheme == "int8" else "uint8",
                               "gate_up_proj_scale": "float32", "down_proj_scale": "float32"}, experts


def test_prefill_chunks_and_single_token_tail(bundles):
    """A prompt of max_prefill + 1 tokens: a full prefill, then its last token through decode."""
    path = bundles("llama", "int8")
    prompt = list(range(5, 5 + MAX_PREFILL + 1))
    want = generate_tokens(eager_step(_eager("llama", "int8"), MAX_SEQ), prompt, max_seq_len=MAX_SEQ,
                           max_prefill=MAX_SEQ, max_new_tokens=5)      # eager: one prefill of 9
    with load_llm(path) as lm:
        assert lm.generate(prompt, max_new_tokens=5, stop=[]).tokens == want.tokens
        one = lm.generate([7], max_new_tokens=3, stop=[])                     # a 1-token prompt
        assert len(one.tokens) == 3


def test_stop_tokens_sampling_and_cache_end(bundles):
    path = bundles("llama", "int8")
    with load_llm(path) as lm:
        greedy = lm.generate(PROMPT, max_new_tokens=6, stop=[])
        stopped = lm.generate(PROMPT, max_new_tokens=6, stop=[greedy.tokens[2]])
        assert stopped.finish_reason == "stop"
        assert stopped.tokens == greedy.tokens[:greedy.tokens.index(greedy.tokens[2]) + 1]
        a = lm.generate(PROMPT, max_new_tokens=10, stop=[], temperature=1.5, seed=3)
        b = lm.generate(PROMPT, max_new_tokens=10, stop=[], temperature=1.5, seed=3)
        c = lm.generate(PROMPT, max_new_tokens=10, stop=[], temperature=1.5, seed=4)
        assert a.tokens == b.tokens
        assert a.tokens != c.tokens
        top1 = lm.generate(PROMPT, max_new_tokens=6, stop=[], temperature=1.0, top_k=1, seed=9)
        assert top1.tokens == greedy.tokens                          # top_k=1 is greedy
        full = lm.generate(list(range(1, MAX_SEQ - 2)), max_new_tokens=50, stop=[])
        assert full.finish_reason == "cache"
        assert full.prompt_tokens + len(full.tokens) == MAX_SEQ + 1   # the last one needs no cache slot


def test_generate_takes_token_ids_and_refuses_the_rest():
    """A stop token given as one int (an eos_token_id) and prompts given as numpy or 1-D
    tensors work; text, a tokenizer's [1, T] tensor, floats and settings of the wrong type are
    one-line InputError / OptionError, not a TypeError from inside the loop or a silent misread
    ("12" as the tokens 1 and 2). Sampling with a seed repeats; without one it does not."""
    import numpy as np

    def step(ids, pos):                     # the next token is the last plus one
        return torch.nn.functional.one_hot((ids + 1) % 16, 16).float()

    def gen(prompt=(1, 2, 3), **kwargs):
        return generate_tokens(step, prompt, max_seq_len=12, max_prefill=4, **kwargs)

    assert gen(stop=5).tokens == [4, 5]
    assert gen(stop=np.int64(5)).tokens == gen(stop=torch.tensor([5])).tokens == [4, 5]
    assert gen(np.array([1, 2, 3]), max_new_tokens=2).tokens == gen(torch.tensor([1, 2, 3]), max_new_tokens=2).tokens
    for prompt, match in (("123", "text"), (torch.tensor([[1, 2, 3]]), r"\[1, 3\]"), ([1.5, 2.0], "token ids"),
                          (7, "token ids")):
        with pytest.raises(aoti_rt.InputError, match=match) as e:
            gen(prompt)
        assert "\n" not in str(e.value)
    uniform = dict(max_new_tokens=12, stop=[], temperature=1e6)      # every token about equally likely
    assert gen(seed=5, **uniform).tokens == gen(seed=5, **uniform).tokens
    assert gen(**uniform).tokens != gen(**uniform).tokens            # no seed: each call its own sample
    assert gen(temperature=1e-40, max_new_tokens=3).tokens == [4, 5, 6]    # the greedy limit, not NaN
    for kwargs in ({"stop": "12"}, {"stop": None}, {"stop": [[5]]}, {"max_new_tokens": None},
                   {"max_new_tokens": 2.5}, {"top_k": 2.5, "temperature": 1.0}, {"temperature": "0.5"},
                   {"seed": "a", "temperature": 1.0}, {"seed": 2**70, "temperature": 1.0}):
        with pytest.raises(aoti_rt.OptionError, match=next(iter(kwargs))):
            gen(**kwargs)


def test_prompt_longer_than_cache_is_input_error(bundles):
    path = bundles("llama", "int8")
    with load_llm(path) as lm:
        with pytest.raises(aoti_rt.InputError, match="max_seq_len") as e:
            lm.generate(list(range(MAX_SEQ + 5)))
        assert "\n" not in str(e.value)
        with pytest.raises(aoti_rt.InputError, match="empty"):
            lm.generate([])
        with pytest.raises(aoti_rt.InputError, match="vocabulary"):
            lm.generate([3, 128, 4])                      # vocab_size is 128
        with pytest.raises(aoti_rt.InputError, match="vocabulary"):
            lm.generate([-1, 4])
        ids, pos = torch.tensor([[3, 4]]), torch.tensor([0, 1])
        assert lm.step(ids, pos).shape[-1] == 128
        for bad_ids, bad_pos in (([[3, 128]], [0, 1]), ([[-1, 4]], [0, 1]), ([[5]], [MAX_SEQ]), ([[3, 4]], [-1, 0])):
            with pytest.raises(aoti_rt.InputError, match=r"\[0, 128\).*\[0, %d\)" % MAX_SEQ):
                lm.step(torch.tensor(bad_ids), torch.tensor(bad_pos))
        with pytest.raises(aoti_rt.InputError, match=r"\[1, T\]"):
            lm.step(torch.tensor([3, 4]), torch.tensor([0, 1]))


@pytest.mark.parametrize("family,form", [("llama", "quantized"), ("llama", "float"), ("qwen3_moe", "float")])
def test_update_weights_by_the_models_own_names(bundles, family, form):
    """New weights given by the user's state_dict names, quantized (torchao tensors) or in full
    precision (quantized as at export; MoE experts' 3-D weights too), make the bundle compute
    what the new model computes."""
    path = bundles(family, "int8")
    new = _eager(family, "int8", seed=1)
    if form == "quantized":
        weights = dict(new.state_dict())
    else:
        torch.manual_seed(1)
        plain = transformers.AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
        weights = dict(plain.state_dict())
    want = generate_tokens(eager_step(new, MAX_SEQ), PROMPT, max_seq_len=MAX_SEQ, max_prefill=MAX_PREFILL,
                           max_new_tokens=8)
    with load_llm(path) as lm:
        before = lm.generate(PROMPT, max_new_tokens=8, stop=[])
        weights = {k: v for k, v in weights.items() if k in lm.info.weights}
        assert any("q_proj.weight" in k for k in weights)
        if family == "qwen3_moe":
            assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"} <= set(weights)
        lm.update_weights(weights)
        after = lm.generate(PROMPT, max_new_tokens=8, stop=[])
        assert after.tokens == want.tokens
        assert after.tokens != before.tokens
        with pytest.raises(aoti_rt.InputError, match="no weight"):
            lm.update_weights({"model.layers.0.not_a_weight": torch.zeros(1)})
        if family == "qwen3_moe":
            experts = "model.layers.0.mlp.experts.gate_up_proj"
            with pytest.raises(aoti_rt.InputError, match="full precision"):
                lm.update_weights({experts: torch.zeros(4, 64, 64, dtype=torch.int32)})
            with pytest.raises(aoti_rt.InputError):                  # quantized, but not its shape
                lm.update_weights({experts: torch.zeros(4, 32, 64)})
            assert lm.generate(PROMPT, max_new_tokens=8, stop=[]).tokens == want.tokens


def _recording_llm(weights, quantize="none"):
    """An LLM over no bundle: ``llm.json``'s ``weights`` map, and a model whose
    ``update_weights`` records what it is given as ``lm.model.mapped``."""
    from aoti_rt.llm.info import LlmInfo

    class Recorder:
        def update_weights(self, mapped, **kwargs):
            self.mapped = mapped

    lm = LLM.__new__(LLM)
    lm.info = LlmInfo(model_type="llama", max_seq_len=8, max_prefill=4, min_prefill=2, vocab_size=128,
                      dtype="float32", quantize=quantize, group_size=GROUP, weights=weights)
    lm.model = Recorder()
    return lm


def test_step_refuses_lists():
    """LLM.step takes tensors; lists are a one-line InputError, not an AttributeError on .shape."""
    lm = _recording_llm({})
    with pytest.raises(aoti_rt.InputError, match="int64 tensors"):
        lm.step([[3, 4]], [0, 1])


def test_a_refused_quantized_update_names_the_users_weight(bundles):
    """A full-precision value of the wrong shape for a quantized weight is quantized, then
    refused by the model's own checks: the error names the weight as the user gave it (and
    the part), not the bundle's parametrization FQNs."""
    with load_llm(bundles("llama", "int8")) as lm:
        name = "model.layers.0.mlp.up_proj.weight"
        assert lm.info.weights[name].parts
        with pytest.raises(aoti_rt.InputError, match=re.escape(name) + r" \(qdata\)") as e:
            lm.update_weights({name: torch.randn(10, 64)})
        assert "parametrizations" not in str(e.value) and "\n" not in str(e.value)


def test_update_weights_refuses_what_it_cannot_quantize():
    """A value for a quantized weight that is not a 2-D or 3-D float tensor (an int tensor, a
    vector, a list) is a one-line InputError, not a RuntimeError from building nn.Linear."""
    from aoti_rt.llm.info import WeightName

    lm = _recording_llm({"w": WeightName(parts={"qdata": "m.w0", "scale": "m.w1"})}, quantize="int8")
    for value in (torch.zeros(64, 64, dtype=torch.int8), torch.zeros(64), [[1.0]],
                  torch.zeros(2, 64, 64, dtype=torch.int32)):
        with pytest.raises(aoti_rt.InputError, match="full precision") as e:
            lm.update_weights({"w": value})
        assert "\n" not in str(e.value)
    lm.update_weights({"w": torch.randn(64, 64)})
    assert set(lm.model.mapped) == {"m.w0", "m.w1"} and lm.model.mapped["m.w0"].dtype == torch.int8


def test_tied_embeddings_update_by_either_name():
    """A model with tie_word_embeddings exported in full precision binds its embedding once:
    ``lm_head.weight`` names that constant too, so ``update_weights(model.state_dict())`` (which
    has both names) is taken, and two different values for the one weight are refused."""
    from aoti_rt.llm.export import export_programs, prepare_model
    from aoti_rt.llm.info import weight_names

    cfg = _config("llama")
    cfg.num_hidden_layers, cfg.tie_word_embeddings = 1, True
    model = prepare_model(cfg)
    programs = export_programs(model, max_seq_len=8, max_prefill=4)
    bound = {fqn for ep in programs.values() for fqn in [*ep.graph_signature.inputs_to_parameters.values(),
                                                         *ep.graph_signature.inputs_to_buffers.values()]}
    names = weight_names(model, bound)
    assert names["lm_head.weight"].fqn == names["model.embed_tokens.weight"].fqn in bound

    lm = _recording_llm(names)
    new = prepare_model(cfg, seed=1)
    lm.update_weights(new.state_dict())
    embed = names["model.embed_tokens.weight"].fqn
    assert torch.equal(lm.model.mapped[embed], new.lm_head.weight)
    with pytest.raises(aoti_rt.InputError, match="tied"):
        lm.update_weights({"lm_head.weight": torch.zeros(128, 64), "model.embed_tokens.weight": torch.ones(128, 64)})


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_experts_compute_the_experts_of_their_dequantized_weights(bits):
    """QuantizedExperts (decode's fused routed path for one token, prefill's dense path for
    several) computes what transformers' own experts compute with the dequantized weights; the
    quantization error is that of symmetric int8 per row / int4 per group."""
    import copy

    from aoti_rt.llm.experts import QuantizedExperts, dequantize

    torch.manual_seed(0)
    experts = _eager("qwen3_moe", "none").model.layers[0].mlp.experts
    q = QuantizedExperts(experts, bits, GROUP)
    ref = copy.deepcopy(experts)
    for name in ("gate_up_proj", "down_proj"):
        w = dequantize(getattr(q, f"{name}_qdata"), getattr(q, f"{name}_scale"), bits, torch.float32)
        full = getattr(experts, name)
        err = float((w - full).abs().max() / full.abs().max())
        assert err <= (1 / 127 if bits == 8 else 1 / 7), err
        getattr(ref, name).data = w
    for tokens in (1, 5):
        x = torch.randn(tokens, 64)
        weights, index = torch.topk(torch.randn(tokens, 4).softmax(-1), 2)
        got, want = q(x, index, weights), ref(x, index, weights)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    one = torch.randn(1, 64)
    weights, index = torch.topk(torch.randn(1, 4).softmax(-1), 2)
    assert torch.allclose(q._routed(one, index[0], weights[0]), q._dense(one, index, weights), atol=1e-6)


def test_low_memory_build_quantizes_each_layer_and_runs():
    """``low_memory``: a config's random weights built a layer at a time on the device (here the
    CPU), each layer quantized before the next; nothing stays on the meta device, the rotary
    tables are transformers' own, and the model generates."""
    from aoti_rt.llm.experts import QuantizedExperts
    from aoti_rt.llm.export import prepare_model

    model = prepare_model(_config("qwen3_moe"), quantize_weights="int4", group_size=GROUP, device="cpu",
                          low_memory=True)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert all(isinstance(layer.mlp.experts, QuantizedExperts) for layer in model.model.layers)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ != "Parameter"      # torchao's
    assert type(model.lm_head.weight).__name__ != "Parameter"
    ref = _eager("qwen3_moe", "none")
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    full = state_bytes(ref)
    assert state_bytes(model) < 0.45 * full, (state_bytes(model), full)
    out = generate_tokens(eager_step(model, MAX_SEQ), PROMPT, max_seq_len=MAX_SEQ, max_prefill=MAX_PREFILL,
                          max_new_tokens=4)
    assert len(out.tokens) == 4
    with pytest.raises(aoti_rt.OptionError, match="PretrainedConfig"):
        prepare_model(ref, low_memory=True)


def test_bundle_records_names_and_sizes(bundles):
    path = bundles("qwen3_moe", "int4")
    info = json.loads((path / "llm.json").read_text())
    assert info["model_type"] == "qwen3_moe"
    assert (info["max_seq_len"], info["max_prefill"]) == (MAX_SEQ, MAX_PREFILL)
    q = info["weights"]["model.layers.0.self_attn.q_proj.weight"]["parts"]
    assert set(q) == {"qdata", "scale_and_zero"}
    assert all(".parametrizations.weight.original" in f for f in q.values())
    experts = info["weights"]["model.layers.0.mlp.experts.gate_up_proj"]["parts"]
    assert experts == {"qdata": "model.model.layers.0.mlp.experts.gate_up_proj_qdata",
                       "scale": "model.model.layers.0.mlp.experts.gate_up_proj_scale"}
    man = aoti_rt.read_bundle(path).manifest
    bound = {c.fqn for m in man.methods.values() for c in m.constants}
    for w in info["weights"].values():
        assert set(w["parts"].values()) <= bound if w["parts"] else w["fqn"] in bound
    prefill = {i.name: i for i in man.methods["prefill"].inputs}
    assert prefill["input_ids"].dims is not None


def test_unsupported_family_is_one_line_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match="Llama.*Qwen3.*Qwen3-MoE") as e:
        export_llm(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64), tmp_path / "g",
                   progress=False)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, aoti_rt.AotiRtError)
    assert not (tmp_path / "g").exists()


def test_sizes_are_checked_before_any_work(tmp_path, capsys):
    """max_seq_len and max_prefill outside what export takes are OptionErrors before the model
    is built; max_prefill 2 (prefill's dynamic length from 2 needs a larger maximum) included."""
    from aoti_rt.cli import main

    for seq, prefill in ((2, None), (8, 9), (8, 1), (8, 0), (8, 2), (8.0, None)):
        with pytest.raises(aoti_rt.OptionError, match="max_seq_len|max_prefill") as e:
            export_llm(_config("llama"), tmp_path / "out", max_seq_len=seq, max_prefill=prefill, progress=False)
        assert "\n" not in str(e.value)
    _config("llama").save_pretrained(tmp_path / "cfg")
    assert main(["llm", "export", "--config", str(tmp_path / "cfg"), str(tmp_path / "out"), "--max-seq-len", "8",
                 "--max-prefill", "2", "-q"]) == 2
    assert "OptionError: max_prefill must be an int from 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_int4_that_quantizes_nothing_is_an_option_error(tmp_path):
    """An int4 group size that divides no weight's input size (the tiny models' are 64 and 128)
    would leave every weight in full precision under an llm.json saying int4: refused."""
    with pytest.raises(aoti_rt.OptionError, match="group_size 256 quantizes none.*64") as e:
        export_llm(_config("llama"), tmp_path / "out", quantize_weights="int4", group_size=256, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_or_absent_device_is_a_device_error(tmp_path):
    """A device name torch does not know, or CUDA on a machine without it, is aoti_rt's one-line
    DeviceError before the model is built, not torch's RuntimeError or AssertionError from
    model.to(); an experts implementation transformers does not have is an OptionError, not
    its ValueError; a bundle path that is taken is refused before the model is built."""
    devices = ["tpu", "cuda:x"] + ([] if aoti_rt.cuda_available() else ["cuda", "cuda:1"])
    for device in devices:
        with pytest.raises(aoti_rt.DeviceError) as e:
            export_llm(_config("llama"), tmp_path / "out", device=device, progress=False)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(aoti_rt.OptionError, match="batched_mm.*'foo'"):
        export_llm(_config("llama"), tmp_path / "out", experts_implementation="foo", progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the bundle path was checked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("aoti_rt.llm.export.prepare_model", no_model)
        with pytest.raises(aoti_rt.CompileError, match="overwrite=True"):
            export_llm(_config("llama"), tmp_path / "taken", progress=False)


def test_bad_checkpoint_paths_are_one_line_errors(tmp_path, capsys):
    """A path that does not exist, a directory without a config.json, one with only a config
    (no weights) and --config on a missing file: each a CheckpointError saying what to pass,
    not transformers' OSError or ValueError, through the API and the command line (exit 2); so
    is a --tokenizer transformers cannot load, or one that gives no tokens."""
    from aoti_rt.cli import main
    from aoti_rt.llm import CheckpointError

    (tmp_path / "empty").mkdir()
    _config("llama").save_pretrained(tmp_path / "config-only")
    for source, match in ((tmp_path / "nope", "does not exist"), (tmp_path / "empty", "no config"),
                          (tmp_path / "config-only", r"weights.*--config"),
                          (tmp_path / "config-only" / "config.json", "not a directory")):
        with pytest.raises(CheckpointError, match=match) as e:
            export_llm(source, tmp_path / "out", progress=False)
        assert "\n" not in str(e.value) and isinstance(e.value, aoti_rt.AotiRtError)
        assert main(["llm", "export", str(source), str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("aoti_rt llm export: CheckpointError:") and "\n" not in err
    assert main(["llm", "export", "--config", str(tmp_path / "nope.json"), str(tmp_path / "out"), "-q"]) == 2
    assert "CheckpointError" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # a tokenizer that cannot be loaded, or one without its files (no tokens for the prompt)
    for tokenizer in (tmp_path / "nope", tmp_path / "empty", tmp_path / "config-only"):
        assert main(["llm", "generate", str(tmp_path), "--prompt", "hi", "--tokenizer", str(tokenizer)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("aoti_rt llm generate: CheckpointError:") and "tokenizer" in err and "\n" not in err


def test_runtime_rope_is_refused_before_export(tmp_path):
    """rope_type 'dynamic' recomputes the rotary table by sequence length inside forward, which
    torch.export cannot capture: an UnsupportedModelError that says what to set, before the
    model is built (not torch.export's data-dependent-branch error after it)."""
    cfg = _config("llama")
    cfg.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(UnsupportedModelError, match="'dynamic'.*'default'") as e:
        export_llm(cfg, tmp_path / "d", max_seq_len=16, max_prefill=8, progress=False)
    assert "\n" not in str(e.value)
    cfg.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    from aoti_rt.llm.source import check_family
    assert check_family(cfg) == "llama"


def test_export_failure_hints_at_experts_only_for_full_precision_experts(monkeypatch):
    """A failed torch.export is a one-line CompileError; it suggests another
    experts_implementation only for a model whose experts transformers' kernels still run."""
    from aoti_rt.llm.export import export_programs

    def fail(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")
    monkeypatch.setattr(torch.export, "export", fail)
    for family, scheme, hint in (("llama", "none", False), ("qwen3_moe", "int8", False), ("qwen3_moe", "none", True)):
        with pytest.raises(aoti_rt.CompileError, match="RuntimeError: boom") as e:
            export_programs(_eager(family, scheme), max_seq_len=8, max_prefill=4)
        assert ("experts_implementation" in str(e.value)) == hint and "\n" not in str(e.value)


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)      # import transformers fails
    with pytest.raises(MissingExtraError, match=r"pip install 'aoti_rt\[llm\]'") as e:
        export_llm(object(), tmp_path / "x", progress=False)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, ImportError) and isinstance(e.value, aoti_rt.AotiRtError)


def test_cli(bundles, capsys, tmp_path):
    from aoti_rt.cli import main

    path = bundles("llama", "int8")
    assert main(["llm", "generate", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "5",
                 "--stop", ""]) == 0
    out = capsys.readouterr()
    with load_llm(path) as lm:
        want = lm.generate(PROMPT, max_new_tokens=5, stop=[]).tokens
    assert out.out.strip() == ",".join(map(str, want))
    assert "tokens/s" in out.err
    with pytest.raises(SystemExit) as e:
        main(["llm", "--help"])
    assert e.value.code == 0
    assert "llm export" in capsys.readouterr().out
    cfg = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(cfg)
    assert main(["llm", "export", "--config", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aoti_rt llm export: UnsupportedModelError:") and "\n" not in err
    assert main(["llm", "generate", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "BundleError" in capsys.readouterr().err


def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    """A wrong combination of options or a malformed id list exits 2 with the command's one-line
    error, as argparse's usage errors and aoti_rt's errors do (not exit 1 from SystemExit)."""
    from aoti_rt.cli import main

    for argv, what in ((["export", "a", "b", "--config", "c"], "--config"),
                       (["generate", str(tmp_path), "--prompt-ids", "1,x"], "--prompt-ids"),
                       (["generate", str(tmp_path), "--prompt-ids", "1", "--stop", "y"], "--stop"),
                       (["generate", str(tmp_path), "--prompt", "hi"], "--tokenizer")):
        assert main(["llm", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"aoti_rt llm {argv[0]}: OptionError:") and what in err and "\n" not in err


def test_llm_class_is_exported():
    assert LLM.generate.__doc__ and export_llm.__doc__


def test_grouped_mm_without_cuda_shim_is_refused():
    from aoti_rt.llm import NoShimError
    from aoti_rt.llm.source import check_shims

    with pytest.raises(NoShimError, match=r"aten\._grouped_mm.*torch 2\.12.*batched_mm") as e:
        check_shims("grouped_mm", "cuda:0", "2.11.0+cu130")
    assert "\n" not in str(e.value)
    check_shims("grouped_mm", "cuda", "2.12.0")         # has the shim
    check_shims("grouped_mm", "cpu", "2.11.0")          # the CPU path has no such gap
    check_shims("batched_mm", "cuda", "2.11.0")


def test_only_full_precision_experts_need_transformers_experts_kernel():
    """grouped_mm (transformers' default) matters only for experts left in full precision:
    quantized experts run aoti_rt's own forward, so they are not refused for its missing shim."""
    from aoti_rt.llm.source import check_shims, experts_kernel

    full = _eager("qwen3_moe", "none", experts_implementation="grouped_mm")
    assert experts_kernel(full) == "grouped_mm"
    assert experts_kernel(_eager("llama", "none")) is None                 # no experts at all
    for scheme in ("int8", "int4"):
        quantized = _eager("qwen3_moe", scheme, experts_implementation="grouped_mm")
        assert experts_kernel(quantized) is None
        check_shims(experts_kernel(quantized), "cuda:0", "2.11.0+cu130")


def test_constants_outgrowing_the_quantized_state_warn(tmp_path):
    """A bundle whose constants are the dequantized float32 weights of an int8 model (what
    inductor's freezing makes of a dequantization it folds) is one copy still, but of larger
    weights: the export's check warns with the figures and the setting."""
    from aoti_rt.llm.export import warn_if_inflated

    torch.manual_seed(0)
    w = torch.randint(-127, 127, (256, 64), dtype=torch.int8)
    scale = torch.rand(256, 1) / 100
    quantized = {"w": w, "scale": scale}
    folded = torch.nn.Linear(64, 256, bias=False).eval().requires_grad_(False)
    folded.weight.copy_(w.float() * scale)
    with torch.no_grad():
        ep = torch.export.export(folded, (torch.randn(2, 64),))
    bundle = aoti_rt.compile({"f": ep}, tmp_path / "folded", progress=False)
    state = sum(t.untyped_storage().nbytes() for t in quantized.values())
    with pytest.warns(RuntimeWarning, match=r"3\.76x the exported model's.*freezing=True") as rec:
        assert warn_if_inflated(bundle, state, {"freezing": True})
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    assert not warn_if_inflated(bundle, state_bytes(folded))


def test_cli_export_then_generate(bundles, capsys):
    """``llm export --config`` (random weights from the same seed as the API's) prints its
    phases and writes the bundle the API's token test checks against eager; ``llm generate``
    prints what :meth:`LLM.generate` gives."""
    from aoti_rt.cli import main

    path = bundles(*BY_CLI)
    for phase in (f"quantizing weights to {BY_CLI[1]}", "exporting prefill", "exporting decode",
                  "compiling prefill and decode", f"wrote {path}"):
        assert phase in bundles.cli_err
    assert main(["llm", "generate", str(path), "--prompt-ids", ",".join(map(str, PROMPT)), "-n", "6",
                 "--stop", ""]) == 0
    got = capsys.readouterr().out.strip()
    with load_llm(path) as lm:
        assert got == ",".join(map(str, lm.generate(PROMPT, max_new_tokens=6, stop=[]).tokens))


def test_a_checkpoint_saved_without_cache_exports():
    """A config with use_cache false (common in checkpoints saved after training) exports and
    runs with the static cache, instead of the export wrapper's ValueError."""
    from aoti_rt.llm.export import export_programs, prepare_model

    cfg = _config("llama")
    cfg.num_hidden_layers, cfg.use_cache = 1, False
    model = prepare_model(cfg)
    want = generate_tokens(eager_step(model, 8), [3, 4, 5], max_seq_len=8, max_prefill=4, max_new_tokens=3)
    assert len(want.tokens) == 3
    assert set(export_programs(model, max_seq_len=8, max_prefill=4)) == {"prefill", "decode"}


def test_a_quantized_program_compiles_in_this_process_and_says_why():
    """torchao's quantized weights reach the exported program as tensor subclasses, read
    through torch.export's access_subclass_inner_tensor: a compile worker (a fresh interpreter
    over mapped CUDA memory) cannot take them, so the compile stays in this process and says
    that, not that a worker may lack torch's own op."""
    from aoti_rt import compile_workers
    from aoti_rt.llm.export import export_programs

    cfg = _config("llama")
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    quantize(model, "int8", "cpu", GROUP)
    ep = export_programs(model, max_seq_len=8, max_prefill=4)["decode"]
    op = compile_workers._op_of_this_process(ep)
    assert op == "export.access_subclass_inner_tensor.default"
    assert "tensor-subclass weights" in compile_workers._why_local(op)
    assert "fresh interpreter" in compile_workers._why_local("mylib.my_op.default")


def test_quantized_programs_fingerprint_alike_until_a_weight_changes():
    """A resumable compile reuses a method only while its fingerprint holds; torchao's weights
    (tensor subclasses) must hash the same when the model is exported again, and differently
    once their quantized bytes change."""
    from pathlib import Path

    from aoti_rt.compile_resume import Fingerprints
    from aoti_rt.llm.export import export_programs
    from aoti_rt.method_compiler import Job

    cfg = _config("llama")
    cfg.num_hidden_layers = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    quantize(model, "int8", "cpu", GROUP)
    job = Job("decode", Path("work"), Path("out"), "cpu", set(), [], [], {})

    def fingerprint():
        return Fingerprints().of(export_programs(model, max_seq_len=8, max_prefill=4)["decode"], job)
    first = fingerprint()
    assert first is not None and fingerprint() == first
    w = model.model.layers[0].self_attn.q_proj.weight
    inner = getattr(w, w.__tensor_flatten__()[0][0])
    inner.view(-1)[0] += 1
    assert fingerprint() != first


def test_a_quantized_model_is_not_quantized_again():
    """export_llm quantizes a loaded model in place: exporting it again with a scheme would skip
    its quantized weights and label an int8 bundle int4; that is an OptionError, and
    quantize_weights='none' exports it as it is."""
    from aoti_rt.llm.export import prepare_model

    for family in ("llama", "qwen3_moe"):
        model = _eager(family, "int8")
        with pytest.raises(aoti_rt.OptionError, match="quantized already.*freshly loaded") as e:
            prepare_model(model, quantize_weights="int4", group_size=GROUP)
        assert "\n" not in str(e.value)
        assert prepare_model(model, quantize_weights="none") is model


def test_quantization_options_are_checked():
    from aoti_rt.llm.quant import config_for

    model = _eager("llama", "none")
    with pytest.raises(aoti_rt.OptionError, match="bfloat16"):
        quantize(model, "int4", "cuda", GROUP)          # tinygemm packing: refused before any CUDA work
    with pytest.raises(aoti_rt.OptionError, match="int8, int4"):
        config_for("int3", "cpu")
    with pytest.raises(aoti_rt.OptionError, match="group_size"):
        config_for("int4", "cpu", group_size=48)
    with pytest.raises(aoti_rt.OptionError, match="packing"):
        config_for("int4", "cpu", packing="tile_packed_to_4d")
    assert config_for("none", "cpu") is None


CUDA = aoti_rt.cuda_available() and torch.cuda.is_available()


def _forced_logits(step, prompt: list[int], tokens: list[int], device: str) -> list[torch.Tensor]:
    """The last-position logits after ``prompt`` and after each of ``tokens`` (teacher forcing)."""
    ids = torch.tensor([prompt], device=device)
    out = [step(ids, torch.arange(len(prompt), device=device))[0, -1].float()]
    for i, t in enumerate(tokens):
        pos = torch.tensor([len(prompt) + i], device=device)
        out.append(step(torch.tensor([[t]], device=device), pos)[0, -1].float())
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("family,scheme", [("llama", "int4"), ("qwen3_moe", "int4"), ("llama", "int8")])
def test_cuda_bf16_quantized_matches_eager_and_one_copy(tmp_path, family, scheme):
    """On CUDA, bfloat16 with torchao's CUDA kernels (int4: tinygemm tile packing): greedy tokens
    equal to the quantized eager model's, or differing only where eager's top two logits are
    within the logits' difference (a near-tie); one copy of the quantized bytes."""
    dev = "cuda:0"
    experts = "batched_mm" if family == "qwen3_moe" else None    # grouped_mm: no C shim before torch 2.12
    path = export_llm(_config(family), tmp_path / "b.aoti", max_seq_len=MAX_SEQ, max_prefill=MAX_PREFILL,
                      quantize_weights=scheme, group_size=GROUP, device=dev, dtype=torch.bfloat16,
                      experts_implementation=experts, progress=False)
    kwargs = {"experts_implementation": experts} if experts else {}
    model = _eager(family, scheme, device=dev, dtype=torch.bfloat16, **kwargs)
    eager = eager_step(model, MAX_SEQ)
    want = generate_tokens(eager, PROMPT, max_seq_len=MAX_SEQ, max_prefill=MAX_PREFILL, max_new_tokens=8,
                           device=dev)
    with load_llm(path, device=dev) as lm:
        got = lm.generate(PROMPT, max_new_tokens=8, stop=[])
        if got.tokens != want.tokens:
            ref = _forced_logits(eager, PROMPT, want.tokens[:-1], dev)
            ours = _forced_logits(lm.step, PROMPT, want.tokens[:-1], dev)
            for i, (a, b) in enumerate(zip(ref, ours)):
                if int(a.argmax()) != int(b.argmax()):
                    top2 = a.topk(2).values
                    diff = float((a - b).abs().max())
                    assert float(top2[0] - top2[1]) <= 2 * diff, (i, float(top2[0] - top2[1]), diff)
                    break
        wrapper = transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM(
            model, batch_size=1, max_cache_len=MAX_SEQ).model
        quantized = state_bytes(wrapper)
        held = aoti_rt.cache_stats(lm.model.device)["bytes_allocated"]
        assert f"{held / lm.model.manifest.unique_weight_bytes():.2f}" == "1.00"
        assert 0.95 * quantized <= held <= 1.005 * quantized, (held, quantized)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_cuda_int4_moe_load_peak_is_one_copy(tmp_path):
    """The motivating case at a small scale: an int4 Qwen3-MoE (experts int4 too, ~110 MB) holds
    one copy of its weights and KV cache, and the device-wide peak while it loads stays within
    1.02x of that (plus 16 MiB for the .so's kernel images); stock per-method loading is ~2x."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=4096, hidden_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=2, head_dim=128, intermediate_size=2048,
                                      moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4,
                                      max_position_embeddings=512)
    dev = "cuda:0"
    path = export_llm(cfg, tmp_path / "moe.aoti", max_seq_len=128, max_prefill=64, quantize_weights="int4",
                      group_size=128, device=dev, dtype=torch.bfloat16, low_memory=True, progress=False)
    man = aoti_rt.read_bundle(path).manifest
    one_copy = man.unique_weight_bytes()
    assert one_copy > 80 * 2**20
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    aoti_rt.reset_peak(dev)
    base = aoti_rt.memory_report(dev).device_used_bytes
    with aoti_rt.Sampler(dev, interval=0.0005):
        lm = load_llm(path, device=dev)
    with lm:
        peak = aoti_rt.memory_report(dev).device_peak_used_bytes - base
        assert aoti_rt.cache_stats(dev)["bytes_allocated"] == one_copy
        assert peak <= 1.02 * one_copy + 16 * 2**20, (peak, one_copy)
        out = lm.generate(PROMPT, max_new_tokens=4, stop=[])
        assert len(out.tokens) == 4
    assert sum(man.per_method_bytes(m) for m in man.methods) / one_copy > 1.9
