"""The toy pair's tokenizer and chat templates.

Character-level (a ``tokenizers`` WordLevel model over single characters plus ChatML special
tokens) and identical, id for id, for both models; only the chat templates differ (the thinking
one appends ``<think>\\n`` to the generation prompt).
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from dami_jax.models.tokenizer import THINK_CLOSE, THINK_OPEN, PreTrainedTokenizerFast

# Special tokens (Qwen/ChatML names).
ENDOFTEXT = "<|endoftext|>"  # padding
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of turn: the EOS that generation stops on
UNK = "<|unk|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, UNK)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)  # added tokens, kept by decode(skip_special_tokens=True)
CHARACTERS = "\n " + string.digits + string.ascii_lowercase + string.ascii_uppercase + "=+-*/%^,.;:?!()[]'\"_#<>|"

# ChatML. Earlier assistant turns keep only their text after </think> (Qwen3 convention).
_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)
INSTRUCT_CHAT_TEMPLATE = _TEMPLATE
THINKING_CHAT_TEMPLATE = _TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")


def prompt_text(question: str, thinking: bool) -> str:
    """The text the chat template renders for one user turn plus the generation prompt."""
    text = f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
    return text + f"{THINK_OPEN}\n" if thinking else text


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens, think tokens, then one token per character."""
    tokens = [*SPECIAL_TOKENS, *THINK_TOKENS, *CHARACTERS]
    assert len(set(tokens)) == len(tokens)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(thinking: bool):
    """A ``transformers`` fast tokenizer: character-level, ChatML specials, eos ``<|im_end|>``,
    pad ``<|endoftext|>``; the chat template of the Thinking (``thinking=True``) or Instruct model."""
    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=UNK,
        chat_template=THINKING_CHAT_TEMPLATE if thinking else INSTRUCT_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
