"""Token generation over a prefill/decode bundle: :class:`LLM` and :func:`generate_tokens`."""

from __future__ import annotations

import numbers
import operator
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from ..errors import InputError, OptionError
from .info import LlmInfo, WeightName

#: ``step(input_ids[1, T], cache_position[T]) -> logits[1, T, vocab]``
Step = Callable[[Any, Any], Any]


@dataclass
class Generation:
    """What :meth:`LLM.generate` produced.

    ``tokens``: the new tokens (a stop token that ended generation included);
    ``finish_reason``: "stop" (a stop token), "length" (``max_new_tokens``) or "cache"
    (the KV cache is full); ``prefill_s`` and ``decode_s``: seconds spent in each."""

    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_s: float
    decode_s: float


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pick(logits: Any, temperature: float, top_k: int | None, generator: Any) -> int:
    import torch

    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float()
    logits = (logits - logits.max()) / temperature       # <= 0: a tiny temperature gives -inf, never inf - inf
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def token_ids(prompt: Any) -> list[int]:
    """``prompt`` as a list of token ids: ints (numpy's too) or a 1-D integer tensor.

    Raises:
        InputError: text, floats, or a tensor of another shape (a tokenizer's ``[1, T]``).
    """
    if isinstance(prompt, (str, bytes)):
        raise InputError("generate: the prompt is text; pass its token ids (tokenizer(text)['input_ids'], or "
                         "--prompt with --tokenizer)")
    if getattr(prompt, "ndim", 1) != 1:
        raise InputError(f"generate: the prompt is a tensor of shape {list(prompt.shape)}; pass token ids in one "
                         f"dimension (ids[0] of a tokenizer's [1, T])")
    try:
        return [operator.index(t) for t in prompt]
    except TypeError:
        raise InputError(f"generate: the prompt must be token ids (ints, or a 1-D integer tensor), not "
                         f"{str(prompt)[:60]}") from None


def _stop_ids(stop: Any) -> set[int]:
    """``stop`` (one token id or several) as a set of ints."""
    if isinstance(stop, numbers.Integral) or getattr(stop, "ndim", None) == 0:
        stop = [stop]
    try:
        if not isinstance(stop, (str, bytes)):
            return {operator.index(t) for t in stop}
    except TypeError:
        pass
    raise OptionError(f"stop must be a token id or a list of them, not {str(stop)[:60]!r}")


def generate_tokens(step: Step, prompt: Iterable[int], *, max_seq_len: int, max_prefill: int,
                    min_prefill: int = 2, max_new_tokens: int = 32, stop: Iterable[int] = (),
                    temperature: float = 0.0, top_k: int | None = None, seed: int | None = None,
                    device: Any = "cpu") -> Generation:
    """Prefill ``prompt`` (in chunks of at most ``max_prefill`` tokens; a 1-token chunk through
    the decode shape), then decode one token at a time.

    ``temperature`` 0 is greedy; above 0, tokens are sampled from the softmax of the logits
    divided by it (over the ``top_k`` most likely, if given) with a ``torch.Generator`` seeded
    with ``seed`` (the same seed, the same tokens; None: a fresh random seed each call, so
    repeated calls give different samples). Generation ends at a token in ``stop`` (one id or
    several), after ``max_new_tokens``, or when the cache is full.

    Raises:
        InputError: a prompt that is not token ids (:func:`token_ids`), is empty, or leaves no
            room in the cache.
        OptionError: a temperature that is not a number >= 0, ``top_k`` or ``max_new_tokens``
            not an int >= 1, a ``seed`` not an int, ``stop`` not token ids.
    """
    import torch

    ids = token_ids(prompt)
    if not ids:
        raise InputError("generate: the prompt is empty; pass at least one token id")
    if len(ids) >= max_seq_len:
        raise InputError(f"generate: the prompt has {len(ids)} tokens and the KV cache holds {max_seq_len}, "
                         f"which leaves no room to generate; shorten the prompt or export with a larger "
                         f"max_seq_len")
    if not isinstance(temperature, numbers.Real) or not temperature >= 0:
        raise OptionError(f"temperature must be a number >= 0 (0: greedy), not {temperature!r}")
    for name, value in (("top_k", top_k), ("max_new_tokens", max_new_tokens)):
        if (value is not None or name == "max_new_tokens") and (not _is_int(value) or value < 1):
            raise OptionError(f"{name} must be an int of at least 1, not {value!r}")
    if seed is not None and not (_is_int(seed) and -2**63 <= seed < 2**64):
        raise OptionError(f"seed must be an int (a torch.Generator seed), not {seed!r}")
    stop_set = _stop_ids(stop)
    gen = None
    if temperature > 0:
        gen = torch.Generator()
        if seed is None:
            gen.seed()                  # a nondeterministic seed: each call its own sample
        else:
            gen.manual_seed(int(seed))

    def call(chunk: list[int], pos: int) -> Any:
        t = torch.tensor([chunk], dtype=torch.long, device=device)
        p = torch.arange(pos, pos + len(chunk), dtype=torch.long, device=device)
        out = step(t, p)
        return (out[0] if isinstance(out, (list, tuple)) else out)[0, -1]

    t0 = time.perf_counter()
    pos = 0
    while pos < len(ids):
        n = min(max_prefill, len(ids) - pos)
        if n < min_prefill:
            n = 1
        logits = call(ids[pos:pos + n], pos)
        pos += n
    t1 = time.perf_counter()
    out: list[int] = []
    reason = "length"
    while True:
        tok = _pick(logits, temperature, top_k, gen)
        out.append(tok)
        if tok in stop_set:
            reason = "stop"
            break
        if len(out) >= max_new_tokens:
            break
        if pos >= max_seq_len:
            reason = "cache"
            break
        logits = call([tok], pos)
        pos += 1
    return Generation(out, reason, len(ids), t1 - t0, time.perf_counter() - t1)


class LLM:
    """A loaded prefill/decode bundle written by :func:`aoti_rt.llm.export_llm`.

    ``model`` is the :class:`aoti_rt.Model` (one copy of each weight and one KV cache);
    ``info`` the bundle's :class:`~aoti_rt.llm.info.LlmInfo`. Close it (or use ``with``).
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | None = None, **load_kwargs: Any):
        import aoti_rt

        self.info = LlmInfo.read(path)
        self.model = aoti_rt.load(path, device=device, **load_kwargs)
        self.path = path

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the model's memory."""
        self.model.close()

    def step(self, input_ids: Any, cache_position: Any) -> Any:
        """One call of ``prefill`` (``T >= min_prefill`` tokens) or ``decode`` (1 token):
        ``input_ids[1, T]`` (int64) written at ``cache_position[T]`` of the KV cache.

        The values are checked before the call (one device sync): the compiled kernels index
        the embedding with the ids and the KV cache with the positions, unchecked.

        Raises:
            InputError: not tensors, a shape other than ``[1, T]`` / ``[T]``, a token id
                outside the vocabulary or a position outside the KV cache.
        """
        import torch

        info = self.info
        if not (isinstance(input_ids, torch.Tensor) and isinstance(cache_position, torch.Tensor)):
            raise InputError(f"step: pass input_ids [1, T] and cache_position [T] as int64 tensors, not "
                             f"{type(input_ids).__name__} and {type(cache_position).__name__}")
        shape, pos_shape = tuple(input_ids.shape), tuple(cache_position.shape)
        if len(shape) != 2 or shape[0] != 1 or pos_shape != shape[1:]:
            raise InputError(f"step: input_ids is {list(shape)} and cache_position {list(pos_shape)}; pass "
                             f"input_ids [1, T] and cache_position [T]")
        if input_ids.numel():
            bad = ((input_ids < 0) | (input_ids >= info.vocab_size)).any() \
                | ((cache_position < 0) | (cache_position >= info.max_seq_len)).any()
            if bool(bad):
                raise InputError(f"step: token ids must lie in [0, {info.vocab_size}) and cache positions in "
                                 f"[0, {info.max_seq_len}) (the KV cache's length); pass ids from the model's "
                                 f"tokenizer and positions below max_seq_len")
        return self._step(input_ids, cache_position)

    def _step(self, input_ids: Any, cache_position: Any) -> Any:
        """:meth:`step` without the value checks (:meth:`generate` checked the ids and positions)."""
        method = self.model.decode if input_ids.shape[-1] == 1 else self.model.prefill
        return method(input_ids=input_ids, cache_position=cache_position)

    def generate(self, prompt: Iterable[int], *, max_new_tokens: int = 32, stop: Iterable[int] | None = None,
                 temperature: float = 0.0, top_k: int | None = None, seed: int | None = None) -> Generation:
        """Generate after ``prompt`` (token ids); see :func:`generate_tokens`. ``stop``
        defaults to the model's EOS tokens (``[]`` for none)."""
        info = self.info
        prompt = token_ids(prompt)
        bad = [t for t in prompt if not 0 <= t < info.vocab_size]
        if bad:       # an embedding index out of range is a device-side assert on CUDA: refuse it here
            raise InputError(f"generate: token ids {bad[:5]} are outside the model's vocabulary "
                             f"[0, {info.vocab_size}); pass ids from its tokenizer")
        return generate_tokens(self._step, prompt, max_seq_len=info.max_seq_len, max_prefill=info.max_prefill,
                               min_prefill=info.min_prefill, max_new_tokens=max_new_tokens,
                               stop=info.eos_token_ids if stop is None else stop, temperature=temperature,
                               top_k=top_k, seed=seed, device=self.model.device)

    def update_weights(self, weights: Mapping[str, Any], **kwargs: Any) -> Any:
        """Write new weights given by the names of the user's transformers model (its
        ``state_dict`` names). A quantized weight may be given as the torchao tensor (its parts
        are written) or in full precision (it is quantized as at export). Other keyword
        arguments go to :meth:`aoti_rt.Model.update_weights`.

        A tied weight's names (``lm_head.weight``, ``model.embed_tokens.weight``) name one
        constant: either updates it (a ``state_dict`` gives both, equal).

        Raises:
            InputError: a name the bundle does not hold (unless ``strict=False``), different
                values for one tied weight, or a value that does not fit (see
                :meth:`aoti_rt.Model.update_weights`).
        """
        strict = kwargs.get("strict", True)
        mapped: dict[str, Any] = {}
        given: dict[str, str] = {}
        unknown = []
        for name, value in weights.items():
            entry = self.info.weights.get(name)
            if entry is None:
                unknown.append(name)
                continue
            for fqn, part in self._parts(name, entry, value).items():
                if fqn in mapped and not _same(mapped[fqn], part):
                    raise InputError(f"update_weights: {given[fqn]} and {name} are one tied weight in the bundle "
                                     f"({fqn}), given different values; pass one of them, or equal values")
                mapped[fqn], given[fqn] = part, name
        if unknown and strict:
            raise InputError(f"update_weights: the model has no weight {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''}; it holds {len(self.info.weights)}, e.g. "
                             f"{', '.join(list(self.info.weights)[:3])} (strict=False ignores unknown names)")
        try:
            return self.model.update_weights(mapped, **kwargs)
        except InputError as e:       # in the user's names: a part is "name (its attribute)"
            raise InputError(self._user_names(str(e), given)) from e

    def _user_names(self, message: str, given: Mapping[str, str]) -> str:
        """``message`` with each bundle FQN of a quantized weight's part replaced by the name it
        was given as, and the part."""
        parts = {fqn: f"{name} ({attr})" for name in set(given.values())
                 for attr, fqn in self.info.weights[name].parts.items()}
        for fqn in sorted(parts, key=len, reverse=True):
            message = message.replace(fqn, parts[fqn])
        return message

    def _parts(self, name: str, entry: WeightName, value: Any) -> dict[str, Any]:
        import torch

        if not entry.parts:
            return {entry.fqn: value}
        if not isinstance(value, torch.Tensor) or getattr(type(value), "__tensor_flatten__", None) is None:
            value = self._quantize(name, value)
        try:
            return {fqn: getattr(value, attr) for attr, fqn in entry.parts.items()}
        except AttributeError:
            raise InputError(f"update_weights: {name} is a {type(value).__name__}, whose parts are not "
                             f"{', '.join(entry.parts)}; pass it quantized as at export ({self.info.quantize}) "
                             f"or in full precision") from None

    def _quantize(self, name: str, value: Any) -> Any:
        import torch

        from .experts import QuantizedWeight, quantize_weight
        from .quant import quantize

        if isinstance(value, QuantizedWeight):
            return value
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3) or not value.is_floating_point():
            what = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"update_weights: {name} is a weight quantized to {self.info.quantize}; pass it in full "
                             f"precision (a 2-D float tensor, 3-D for MoE experts) or as the quantized tensor, "
                             f"not {what}")
        if value.dim() == 3 and self.info.quantize in ("int8", "int4"):
            bits = 8 if self.info.quantize == "int8" else 4
            if bits == 4 and value.shape[-1] % self.info.group_size:
                raise InputError(f"update_weights: {name} is MoE experts' weight quantized to {self.info.quantize}; "
                                 f"pass it in full precision ([experts, out, in], in a multiple of the group size "
                                 f"{self.info.group_size} for int4), not {value.dtype} {tuple(value.shape)}")
            return quantize_weight(value.detach(), bits, self.info.group_size)
        lin = torch.nn.Linear(value.shape[1], value.shape[0], bias=False, device=value.device, dtype=value.dtype)
        lin.weight = torch.nn.Parameter(value.detach(), requires_grad=False)
        dev = "cpu" if value.device.type == "cpu" else "cuda"
        quantize(lin, self.info.quantize, dev, self.info.group_size, self.info.packing)
        return lin.weight


def _same(a: Any, b: Any) -> bool:
    """Whether two values given for one constant (a tied weight's two names) are equal."""
    import torch

    if a is b:
        return True
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
        return False
    # a state_dict's two names of a tied weight are views of one storage: no need to compare them
    return (a.data_ptr(), a.stride()) == (b.data_ptr(), b.stride()) or bool(torch.equal(a, b))


def load_llm(path: str | os.PathLike[str], *, device: str | None = None, **load_kwargs: Any) -> LLM:
    """Load a bundle written by :func:`aoti_rt.llm.export_llm` (keyword arguments go to
    :func:`aoti_rt.load`)."""
    return LLM(path, device=device, **load_kwargs)
