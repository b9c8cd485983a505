"""The runtimes an export is checked in, behind one interface (`base.Runtime`): each says whether it can
run an export here, runs it, and scores validation's held-out windows (`scores.Scores`), compared with
transformers' by `check.serve_check`."""

from pipeline.runtimes.llamacpp import LlamaCpp
from pipeline.runtimes.vllm import VLLM

RUNTIMES = {"vllm": VLLM(), "llama.cpp": LlamaCpp()}
