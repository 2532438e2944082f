"""
Tokenizer, chat templates, data sets and the built-in demo task.

    tok = Tokenizer.from_pretrained("path/to/model")         # tokenizer.json + tokenizer_config.json
    text = tok.apply_chat_template([{"role": "user", "content": "1+1?"}])   # the model's own Jinja template
    ids, loss_mask = tok.encode_chat(prompt_messages, completion_text)        # for SFT

Chat templates are rendered the way transformers renders them (sandboxed Jinja with trim_blocks and lstrip_blocks,
the same helpers), so a prompt is byte-for-byte the one the model was trained with.
"""

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# -----------------------------------------------------------------------------
# tokenizer and chat template


def _token_text(token):
    """tokenizer_config.json stores special tokens as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, generation_config: dict | None = None, path=None):
        self.tk = tokenizer
        self.config = config
        self.path = path
        self.generation_config = dict(generation_config or {})
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one is the chat template
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        self._template = compile_chat_template(template) if template else None
        self.special_tokens = {name: _token_text(config.get(name)) for name in
                               ("bos_token", "eos_token", "pad_token", "unk_token")}
        eos = self.generation_config.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.special_tokens["eos_token"] is not None:
            eos_id = self.tk.token_to_id(self.special_tokens["eos_token"])
            if eos_id is not None and eos_id not in eos:
                eos.append(eos_id)
        self.eos_token_ids = eos  # every id that ends a turn, as generation_config lists them
        pad = self.special_tokens["pad_token"]
        self.pad_token_id = self.tk.token_to_id(pad) if pad else (eos[0] if eos else 0)

    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        def read_json(name, required):
            file = os.path.join(path, name)
            if not os.path.exists(file):
                if required:
                    raise FileNotFoundError(f"{file} is missing")
                return None
            with open(file) as f:
                return json.load(f)

        config = read_json("tokenizer_config.json", required=False) or {}
        if "chat_template" not in config and os.path.exists(os.path.join(path, "chat_template.jinja")):
            with open(os.path.join(path, "chat_template.jinja")) as f:  # newer transformers save it beside
                config["chat_template"] = f.read()
        tokenizer = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return cls(tokenizer, config, read_json("generation_config.json", required=False), path=path)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """No special tokens are added: chat templates write BOS themselves, and adding it twice is a classic bug."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self.tk.token_to_id(token)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs) -> str:
        if self._template is None:
            raise ValueError(f"{self.path}: tokenizer_config.json has no chat_template")
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def end_of_turn(self) -> str:
        """The text the template writes after an assistant message, found by rendering a marker."""
        marker = "\u2063END-OF-CONTENT\u2063"
        rendered = self.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], add_generation_prompt=False)
        return rendered[rendered.rindex(marker) + len(marker):]

    def encode_chat(self, prompt_messages, completion: str, **template_kwargs):
        """(input_ids, loss_mask) for SFT: the prompt rendered with the generation prompt, then the completion and
        the end-of-turn text. The mask is 1 on exactly the completion and its end-of-turn token (a trainer that
        masks that token never learns to stop). The pieces are tokenized apart, as the sampler sees them."""
        prompt = self.apply_chat_template(prompt_messages, add_generation_prompt=True, **template_kwargs)
        if prompt.endswith("<think>\n") and completion.startswith("<think>"):
            # R1-style templates open the think block themselves; traces usually carry it too
            completion = completion[len("<think>"):].removeprefix("\n")
        prompt_ids, completion_ids = self.encode(prompt), self.encode(completion)
        end_ids = self.encode(self.end_of_turn())
        stops = [i for i, t in enumerate(end_ids) if t in self.eos_token_ids]
        # keep the end-of-turn text up to its stop token; what follows it (a newline) is never generated
        end_ids = end_ids[: stops[0] + 1] if stops else end_ids + self.eos_token_ids[:1]
        input_ids = prompt_ids + completion_ids + end_ids
        loss_mask = [0] * len(prompt_ids) + [1] * (len(completion_ids) + len(end_ids))
        return input_ids, loss_mask

    def save_pretrained(self, path):
        os.makedirs(path, exist_ok=True)
        self.tk.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(self.config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(dict(self.generation_config, eos_token_id=self.eos_token_ids), f, indent=2)
