"""The embedded toy Instruct/Thinking pair: its arithmetic task, character tokenizer and chat
templates, evaluation, and the shipped weights (``toy-pair/``). Depends on models, decoding, dami
and evals (it is evaluated with the same answering and grading as any benchmark)."""
