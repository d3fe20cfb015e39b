"""The model's tokenizer and chat template, loaded vocabulary-only (no weights, no context).

The request handlers tokenize and render chat templates with this object, outside the engine thread: the
engine (one thread, tova_cpp/server/scheduler.py) then only decodes, and a bad template or message is
refused with a 400 before a request waits for a slot. llama.cpp's vocabulary is read-only once loaded, so
tokenizing from several threads at once is safe.
"""

from __future__ import annotations

import threading
from pathlib import Path

import llama_cpp
from llama_cpp import llama_chat_format

from ..errors import TokenizerError
from ..generate import detokenize, token_piece
from ..llama import _continuation
from ..session import load_model


class Vocab:
    """Tokenize / detokenize / render chat for one GGUF (llama-cpp-python's sandboxed Jinja formatter)."""

    def __init__(
        self, model_path: str | Path, *, chat_format: str | None = None, verbose: bool = False
    ) -> None:
        self._model = load_model(Path(model_path), 0, verbose, vocab_only=True)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # a vocabulary of type "none" (synthetic models): llama.cpp aborts on its pieces and attributes
        self.has_tokenizer = llama_cpp.llama_vocab_type(self._vocab) != llama_cpp.LLAMA_VOCAB_TYPE_NONE
        self._lock = threading.Lock()
        self._formatter = self._chat_formatter(chat_format)

    def _chat_formatter(self, chat_format: str | None):
        if chat_format is not None:
            from ..llama import _registered_formatter

            return _registered_formatter(chat_format)  # ValueError when llama-cpp-python has no such format
        template = llama_cpp.llama_model_chat_template(self._model, None)
        if not template:
            return None

        def text(tok: int) -> str:
            if tok < 0:
                return ""
            return llama_cpp.llama_vocab_get_text(self._vocab, tok).decode(errors="replace")

        eos = llama_cpp.llama_vocab_eos(self._vocab)
        return llama_chat_format.Jinja2ChatFormatter(
            template=template.decode(errors="replace"),
            eos_token=text(eos),
            bos_token=text(llama_cpp.llama_vocab_bos(self._vocab)),
            stop_token_ids=[eos],
        )

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if not self.has_tokenizer:
            raise TokenizerError("the model has no tokenizer; send token ids as the prompt")
        data = text.encode()
        n_max = len(data) + 16
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # -(tokens needed): cannot happen with one slot per byte + specials, but do not trust it
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise TokenizerError(f"llama.cpp could not tokenize the text (code {n})")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        return token_piece(self._vocab, token, special) if self.has_tokenizer else b""

    def detokenize(self, tokens, special: bool = False) -> bytes:
        return detokenize(self._vocab, tokens, special) if self.has_tokenizer else b""

    def is_eog(self, token: int) -> bool:
        return self.has_tokenizer and bool(llama_cpp.llama_vocab_is_eog(self._vocab, int(token)))

    def continuation(self, cached: list[int], tokens: list[int]) -> list[int] | None:
        """The tokens of `tokens` after what `cached` holds, or None if it does not extend it (the cached
        tail may be the same text tokenized another way: tova_cpp.llama's rule)."""
        if not self.has_tokenizer:
            n = len(cached)
            return tokens[n:] if len(tokens) > n and tokens[:n] == cached else None
        return _continuation(self._vocab, cached, tokens)

    def chat_prompt(self, messages: list[dict]) -> tuple[str, list[str]]:
        """The conversation rendered by the model's template with the assistant turn opened, and the
        format's stop strings. ValueError when the model has no template; jinja2's SecurityError /
        TemplateError when the sandbox refuses it."""
        if self._formatter is None:
            raise ValueError("the model has no chat template; use /v1/completions with a raw prompt")
        with self._lock:  # one rendering at a time: templates may keep state in their namespace
            res = self._formatter(messages=messages)
        stops = [res.stop] if isinstance(res.stop, str) else list(res.stop or [])
        return res.prompt, stops

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()
