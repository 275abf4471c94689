"""Offline API in the shape vLLM users know: ``LLM(path).generate(...)`` and ``LLM(path).chat(...)``.

All prompts of one call are admitted together and batched by the engine tick by tick.

Images: ``generate([{"prompt": "<|image|> What is this?", "multi_modal_data": {"image": pil_or_list}}])``
(one ``<|image|>`` placeholder per image in the prompt), or ``chat`` messages with ``image_url`` / ``image``
content parts. Each placeholder becomes the image's soft tokens (``blockdiff.vision.prompt``).
"""

from __future__ import annotations

import operator
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from ..checks import check_tokenizer_fits
from ..config import GenerationDefaults
from ..hub import is_gguf, model_ref, resolve_gguf, resolve_path
from ..loader import load_model
from ..placement import resolve_device
from ..model import DiffusionGemma
from ..sampling.params import SamplingParams
from ..tools.output import ChatText
from ..tools.output import message as chat_message
from ..tools.render import ToolPlan, template_kwargs_problem, template_messages
from ..vision.chat import extract_images
from ..vision.media import ImageLoader, MediaLimits
from ..vision.prompt import ImagePrompter
from .engine import Engine
from .failures import one_line
from .model_state import Event, Metrics, ModelState
from .scheduler import check_max_num_seqs


def _check_parallel(tensor_parallel_size, expert_parallel) -> int:
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
    if expert_parallel and tensor_parallel_size < 2:
        raise ValueError("expert_parallel needs tensor_parallel_size >= 2 (the ranks the experts are placed on)")
    return tensor_parallel_size


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only; ends with the EOS id when it stopped on EOS
    text: str | None
    # "stop" | "length" | "error" (this request alone failed: see ``error``); LLM.chat with tools also "tool_calls" |
    # "invalid_tool_call" (docs/serving.md, "Tools and thinking"); "abort" only through the engine's abort().
    finish_reason: str
    metrics: Metrics
    # SamplingParams.logprobs set: per generated token (logprob, [(token id, logprob), ...] most likely first)
    logprobs: list | None = None
    # LLM.chat with tools or thinking: the parsed answer (see blockdiff/tools)
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict] | None = None
    error: str | None = None  # finish_reason "error": what failed, one line (the other requests ran on)


def _token_ids(ids) -> list:
    """A prompt's ids as Python ints, so a row of a torch / NumPy integer array works like a list; anything that is
    no integer is left as it is for the engine's check to refuse."""
    out = []
    for t in ids:
        try:
            out.append(t if isinstance(t, int) else operator.index(t))
        except TypeError:
            out.append(t)
    return out


def load_tokenizer(path: str):
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        return None
    from ..tokenizer import Tokenizer
    return Tokenizer.from_dir(path)


class _OneCallAtATime:
    """One ``generate`` / ``chat`` at a time per LLM: a call from a second thread waits for the first to finish. A call
    from inside an ``on_event`` callback of a running call would wait for itself: it raises. That callback may run on
    another thread than its call's (the server's engine thread, when ``build_app(llm)`` serves the same LLM: each
    tick advances every request, see ``Engine.lock``), so being inside one is marked per thread by ``callback``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._in_callback = threading.local()

    def __enter__(self):
        if self._owner == threading.get_ident() or getattr(self._in_callback, "depth", 0):
            raise RuntimeError("LLM.generate / chat cannot be called from inside an on_event callback of a running "
                               "call on the same LLM")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()

    def callback(self, on_event, interrupts: list):
        """``on_event`` for the engine. An exception (``Exception``) fails that request alone, as the engine does for
        any; anything else (``KeyboardInterrupt``) is kept in ``interrupts`` and re-raised by the call after the tick,
        so a tick run by the server's thread is never cut short (its other requests stay consistent)."""
        if on_event is None:
            return None
        local = self._in_callback

        def run(ev):
            local.depth = getattr(local, "depth", 0) + 1
            try:
                on_event(ev)
            except Exception:
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the call's own thread
                interrupts.append(e)
            finally:
                local.depth -= 1
        return run


def _conversations(messages) -> list[list[dict]]:
    """``LLM.chat``'s ``messages``: one conversation (a list of message dicts) or a list of them; anything else is
    a ``ValueError`` saying what was expected and what the first misfit is."""
    shape = "a list of {'role': ..., 'content': ...} dicts (one conversation) or a list of such lists"
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else f"a {type(messages).__name__}"
        raise ValueError(f"messages must be {shape}, got {got}")
    if all(isinstance(m, dict) for m in messages):
        return [messages]
    for i, c in enumerate(messages):
        if not isinstance(c, list) or not c or not all(isinstance(m, dict) for m in c):
            what = "an empty list" if c == [] else f"a {type(c).__name__}" if not isinstance(c, list) else \
                "a list holding a " + type(next(m for m in c if not isinstance(m, dict))).__name__
            raise ValueError(f"messages must be {shape}; messages[{i}] is {what}")
    return messages


def _check_flags(**flags) -> None:
    """On/off arguments are booleans: a string such as "no" would be truthy and switch the option on."""
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")

class LLM:
    """``deterministic=True``: a seeded request's output is bit-identical alone or in any batch (the model and
    the sampler compute every request as they would alone; slower under load). The default batches the whole
    tick; a seed then fixes every random draw, but batched arithmetic may round differently (see
    docs/serving.md, "What a seed guarantees"). ``media_limits``: where image files may come from and how many
    images, bytes and pixels one prompt may hold (``blockdiff.vision.media.MediaLimits``). ``quantization``: see
    blockdiff/quant (a ``.gguf`` path brings its own configuration, weights and tokenizer; text only).
    ``device="auto"``: CUDA when present, else CPU. Hub ids: ``revision``, ``download_dir`` (default: the
    huggingface_hub cache under ``$HF_HOME``), and ``gguf_file`` (or ``"org/name:file.gguf"``) for one GGUF file of
    a repo (blockdiff/hub.py).

    ``tensor_parallel_size=N`` splits the model over N processes (``blockdiff.distributed``: this process is rank 0
    and owns the engine; ``expert_parallel=True`` places whole experts per rank instead of splitting each one); call
    ``close()`` (or use ``with``) to end the other ranks. See docs/scaling.md.

    Thread-safe: calls from several threads run one after another. A server built on this LLM (``build_app(llm)``)
    and direct calls share its engine tick by tick (``Engine.lock``): both work at once."""

    def __init__(self, model: str, dtype="auto", device: str = "auto", max_num_seqs: int = 64,
                 deterministic: bool = False, media_limits: MediaLimits | None = None,
                 prefix_cache_bytes: int = 0, quantization: str | None = None, quantize_embedding: bool = True,
                 revision: str | None = None, download_dir: str | None = None, gguf_file: str | None = None,
                 tensor_parallel_size: int = 1, expert_parallel: bool = False):
        if media_limits is not None and not isinstance(media_limits, MediaLimits):
            raise ValueError("media_limits must be a blockdiff.vision.media.MediaLimits, got "
                             f"{type(media_limits).__name__}")
        _check_flags(deterministic=deterministic, quantize_embedding=quantize_embedding,
                     expert_parallel=expert_parallel)
        self.media_limits = media_limits or MediaLimits()
        self._calls = _OneCallAtATime()
        check_max_num_seqs(max_num_seqs)  # before the (slow) load, like every argument
        model = model_ref(model, "model", gguf_file)
        device = resolve_device(device)
        tp = _check_parallel(tensor_parallel_size, expert_parallel)
        if tp > 1 and is_gguf(model, gguf_file):
            raise ValueError("tensor_parallel_size > 1 takes a safetensors checkpoint, not a .gguf file")
        if is_gguf(model, gguf_file):  # config, weights and tokenizer all come from the one file
            from ..quant.gguf import load_gguf
            model = resolve_gguf(model, gguf_file, revision, download_dir)
            self.model_path = model
            self.model, self.tokenizer, self.defaults = load_gguf(model, dtype=dtype, device=device,
                                                                  quantization=quantization,
                                                                  quantize_embedding=quantize_embedding)
            self.model.batch_invariant = bool(deterministic)
            if self.tokenizer is not None:
                check_tokenizer_fits(self.tokenizer, self.model.vocab_size, f"{model} (its tokenizer)")
            self.engine = Engine(self.model, self.defaults, self.tokenizer, max_num_seqs=max_num_seqs,
                                 prefix_cache_bytes=prefix_cache_bytes)
            self.images = ImagePrompter.for_model(self.model, None, self.tokenizer)
            return
        path = resolve_path(model, revision, download_dir)
        self.model_path = path
        load = dict(dtype=dtype, quantization=quantization, quantize_embedding=quantize_embedding)
        if tp > 1:
            from ..distributed import start
            self.model = start(path, tp, expert_parallel, device=device, **load)
        else:
            self.model = load_model(path, device=device, **load)
        try:
            self.model.batch_invariant = bool(deterministic)
            self.defaults = GenerationDefaults.from_dir(path)
            self.tokenizer = load_tokenizer(path)
            if self.tokenizer is not None:
                check_tokenizer_fits(self.tokenizer, self.model.vocab_size, os.path.join(path, "tokenizer.json"))
            self.engine = Engine(self.model, self.defaults, self.tokenizer, max_num_seqs=max_num_seqs,
                                 prefix_cache_bytes=prefix_cache_bytes)
            self.images = ImagePrompter.for_model(self.model, path, self.tokenizer)
        except BaseException:  # (a bad generation_config.json, tokenizer, processor config): no LLM to close() later
            self.close()  # a split model's ranks end with it
            raise

    def close(self) -> None:
        """Return the prefix cache's pages to the model's pool and end the other ranks of a split model."""
        engine = getattr(self, "engine", None)
        if engine is not None and getattr(self.model, "make_prefix_cache", None) is None:
            engine.close()
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def deterministic(self) -> bool:
        return self.engine.deterministic

    @classmethod
    def from_model(cls, model: DiffusionGemma, tokenizer=None, generation_defaults: GenerationDefaults | None = None,
                   max_num_seqs: int = 64, deterministic: bool | None = None,
                   prefix_cache_bytes: int = 0) -> "LLM":
        """Wrap a model already in memory; ``deterministic=None`` keeps its ``batch_invariant`` setting."""
        self = cls.__new__(cls)
        self._calls = _OneCallAtATime()
        if deterministic is not None:
            _check_flags(deterministic=deterministic)
            model.batch_invariant = deterministic
        self.model_path = None
        self.model, self.tokenizer = model, tokenizer
        self.defaults = generation_defaults or GenerationDefaults.from_dict({}, model.text.eos_ids)
        self.engine = Engine(model, self.defaults, tokenizer, max_num_seqs=max_num_seqs,
                             prefix_cache_bytes=prefix_cache_bytes)
        self.images = ImagePrompter.for_model(model, None, tokenizer)
        self.media_limits = MediaLimits()
        return self

    # ------------------------------------------------------------------ prompts
    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: pass prompt_token_ids instead of text")
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def _with_images(self, ids: list[int], images, wheres: list[str] | None = None) -> tuple[list[int], object]:
        """Load (PIL images, bytes, data: URLs...) and process a prompt's images; expand its placeholders."""
        if images is None:
            return ids, None
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images:
            self.images.check_can_take_images()
        return self.images.prepare(ids, ImageLoader(self.media_limits).load_all(list(images), wheres))

    def _prompt(self, p, i: int) -> tuple[str | None, list[int], object]:
        """One prompt: a string, or {"prompt" | "prompt_token_ids", "multi_modal_data": {"image": ...}}."""
        if isinstance(p, str):
            return p, self._encode_text(p), None
        if not isinstance(p, dict):
            raise ValueError(f"prompt {i} must be a string or a dict with 'prompt' (and 'multi_modal_data')")
        unknown = set(p) - {"prompt", "prompt_token_ids", "multi_modal_data"}
        if unknown:
            raise ValueError(f"prompt {i} has unknown keys {sorted(unknown)}")
        if ("prompt" in p) == ("prompt_token_ids" in p):
            raise ValueError(f"prompt {i} needs exactly one of 'prompt' (text) or 'prompt_token_ids'")
        text = p.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"prompt {i}: 'prompt' must be a string")
        ids = self._encode_text(text) if text is not None else _token_ids(p["prompt_token_ids"])
        mmd = p.get("multi_modal_data") or {}
        if not isinstance(mmd, dict) or set(mmd) - {"image"}:
            raise ValueError(f"prompt {i}: multi_modal_data takes only 'image' (a PIL image or a list of them)")
        ids, images = self._with_images(ids, mmd.get("image"))
        return text, ids, images

    def _decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids)

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        on_event: Callable[[Event], None] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts (text) or prompt_token_ids")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if prompts is not None and not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a string or a list of them, got {type(prompts).__name__}")
        if prompts is not None:
            if not all(isinstance(t, (str, dict)) for t in prompts):
                raise ValueError("prompts must be strings or {'prompt': ..., 'multi_modal_data': ...} dicts "
                                 "(use prompt_token_ids for token ids)")
            texts, id_lists, images = map(list, zip(*[self._prompt(p, i) for i, p in enumerate(prompts)])) \
                if prompts else ([], [], [])
        else:
            if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__iter__") or any(
                    isinstance(x, (int, str, bytes)) or not hasattr(x, "__iter__")
                    or getattr(x, "ndim", None) == 0 for x in prompt_token_ids):  # a 1-D tensor's 0-d elements
                raise ValueError("prompt_token_ids must be a list of token-id lists, e.g. [[2, 3, 4]]")
            id_lists = [_token_ids(x) for x in prompt_token_ids]
            texts = [None] * len(id_lists)
            images = [None] * len(id_lists)
        return self._generate_ids(texts, id_lists, images, sampling_params, on_event, use_tqdm)

    def _generate_ids(self, texts, id_lists, images, sampling_params, on_event, use_tqdm) -> list[RequestOutput]:
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable taking an Event, got {type(on_event).__name__}")
        if not id_lists:
            return []
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(id_lists)
        elif isinstance(sampling_params, (str, bytes, dict)) or not hasattr(sampling_params, "__iter__"):
            raise TypeError("sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        else:
            params = list(sampling_params)
            bad = next((p for p in params if not isinstance(p, SamplingParams)), None)
            if bad is not None:
                raise TypeError("sampling_params must be a SamplingParams or a list of them; the list holds a "
                                f"{type(bad).__name__}")
            if len(params) != len(id_lists):
                raise ValueError(f"{len(params)} sampling params for {len(id_lists)} prompts")
        with self._calls:
            interrupts: list[BaseException] = []
            on_event = self._calls.callback(on_event, interrupts)
            # Validate everything before running anything: a bad request never half-runs a batch.
            states = [self.engine.make_state(ids, p, on_event=on_event, request_index=i, images=im)
                      for i, (ids, p, im) in enumerate(zip(id_lists, params, images))]
            return self._run(states, texts, use_tqdm, interrupts)

    def _run(self, states: list[ModelState], texts, use_tqdm: bool,
             interrupts: list | None = None) -> list[RequestOutput]:
        """Tick until every state finished. Another driver of the same engine (a server built on this LLM) may run
        some of those ticks: each tick advances every request, so the loop watches its states, not what its own
        ticks return. ``interrupts``: what the call's ``on_event`` raised to stop it (re-raised after a tick)."""
        interrupts = [] if interrupts is None else interrupts
        for s in states:
            self.engine.add(s)
        pending = list(states)
        done = 0
        try:
            while pending:
                with self.engine.lock:
                    if interrupts:
                        raise interrupts[0]
                    if any(not s.finished for s in pending):  # another driver may have finished them
                        self.engine.step()
                if interrupts:
                    raise interrupts[0]
                left = [s for s in pending if not s.finished]
                if use_tqdm and len(left) < len(pending):
                    done += len(pending) - len(left)
                    print(f"\r[blockdiff] {done}/{len(states)} requests done", end="", file=sys.stderr)
                pending = left
        except BaseException:
            for s in pending:  # leave no half-run request behind in the engine
                self.engine.abort(s.request_id)
            raise
        if use_tqdm:
            print(file=sys.stderr)
        return [self._output(s, text) for s, text in zip(states, texts)]

    def _output(self, s: ModelState, text: str | None) -> RequestOutput:
        """A finished request's output; a failure to detokenize it fails this output alone (finish_reason
        "error")."""
        out_text = None
        if s.finish_reason != "error":
            try:
                out_text = self._decode(s.output_ids)
            except Exception as e:  # noqa: BLE001 - this request's text only
                s.finish_reason, s.error = "error", f"detokenizing its output failed: {one_line(e)}"
        if out_text is not None and s.params.stop and s.constraint is None:  # stops never cut constrained text
            cut = min((out_text.find(x) for x in s.params.stop if x in out_text), default=-1)
            if cut >= 0:
                out_text = out_text[:cut]
        return RequestOutput(s.request_id, text, s.prompt_ids, list(s.output_ids), out_text, s.finish_reason,
                             s.metrics, s.output_logprobs, error=s.error)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        chat_template_kwargs: dict | None = None,
        on_event: Callable[[Event], None] | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, rendered with the
        checkpoint's chat template. Content may be a list of text and image parts (``image_url`` with a data: URL,
        or ``{"type": "image", "image": <PIL image>}``).

        ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` as in OpenAI's API (see docs/serving.md, "Tools and
        thinking"): with tools, or with ``chat_template_kwargs={"enable_thinking": True}``, each output also
        carries ``content``, ``reasoning_content`` and ``tool_calls`` (OpenAI-shaped dicts), and
        ``finish_reason`` is "tool_calls" when it called tools ("invalid_tool_call" when the calls did not parse, or
        none came although ``tool_choice`` required one)."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer, so it has no chat template")
        convs = _conversations(messages)
        if chat_template_kwargs is not None:
            why = template_kwargs_problem(chat_template_kwargs)
            if why is not None:
                raise ValueError(why.replace("{name}", "chat_template_kwargs"))
        plan = ToolPlan.from_request(tools, tool_choice, parallel_tool_calls, chat_template_kwargs)
        kwargs = dict(chat_template_kwargs or {})
        add_generation_prompt = kwargs.pop("add_generation_prompt", None) is not False  # honoured, as the server does
        if plan.template_tools() is not None:
            kwargs["tools"] = plan.template_tools()
        ids, images = [], []
        for c in convs:
            c, sources, wheres = extract_images(template_messages(c))
            self.images.check_texts(c)
            if sources:
                self.images.check_can_take_images()
            x = self.tokenizer.encode_chat(c, add_generation_prompt=add_generation_prompt, **kwargs)
            x, im = self._with_images(x, sources or None, wheres)
            ids.append(x)
            images.append(im)
        if plan.active:  # the grammar of the calls (or of a thinking channel before a constrained answer)
            if sampling_params is None or isinstance(sampling_params, SamplingParams):
                sampling_params = plan.constrain(sampling_params or SamplingParams(), self.tokenizer)
            else:
                sampling_params = [plan.constrain(p, self.tokenizer) for p in sampling_params]
        outs = self._generate_ids([None] * len(ids), ids, images, sampling_params, on_event, False)
        if plan.active:
            for o in outs:
                self._parse_chat(o, plan)
        return outs

    def _parse_chat(self, out: RequestOutput, plan: ToolPlan) -> None:
        ct = ChatText(self.tokenizer, plan, set(self.defaults.eos_token_ids))
        ct.push(out.token_ids)
        _, parsed, out.finish_reason = ct.finish(out.finish_reason)
        msg = chat_message(parsed)
        out.content, out.reasoning_content = msg["content"], msg.get("reasoning_content")
        out.tool_calls = msg.get("tool_calls")

