"""Chat with a model or NEXUS adapter in the terminal, streaming tokens as they are generated.

    nexus chat --model adapter/                          # interactive
    nexus chat --model adapter/ --prompt "Hello"         # answer once and exit (for scripts)
    printf 'Hello\\n/reset\\nHi\\n' | nexus chat --model adapter/ --temperature 0

Prompts are rendered with the tokenizer's own chat template (GPT-OSS: the harmony format) and the
conversation history is kept between turns. Commands: /reset (forget the conversation), /system TEXT
(set the system prompt; starts a new conversation), /help, /exit. Input is read line by line, so a
pipe works as well as a terminal; end of input exits. Ctrl-C during a reply stops that reply and
the session goes on. Piped or redirected output has a blank line after each reply, so turns stay
apart. A reply is at most --max-new-tokens (default: the model's generation_config, else 512)
and never runs past the model's context. A model without a chat template continues each input as
plain text, without history.
"""

from __future__ import annotations

import argparse

from ..device import add_device_arguments, load_for_inference
from .session import add_sampling_arguments, sampling_from_args, start_chat


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="NEXUS adapter directory or transformers model directory")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    add_sampling_arguments(p)
    add_device_arguments(p)


def run(args) -> int:
    sampling_from_args(args)  # check the flags before the (slow) model load
    model = load_for_inference(args.model, args)
    start_chat(model, args.model, args)
    return 0
