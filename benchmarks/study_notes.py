"""The prose of docs/study.md (benchmarks/study_report.py adds every figure from the results JSON)."""

INTRO = """\
Written by `benchmarks/study.py` (see its docstring for the exact commands); raw results in
`docs/study/results_q{1,2,3}.json`. Model: the bundled demo MoE (GPT-OSS architecture, 4 layers,
32 experts, top-4, hidden 128, expert width 64), specialized to its held-out domain (`email` + `http`
of the standard library). Every run trains on the same domain_train batches for a seed (the Trainer's
data order), with the same loss, CE + 1 × T² × KL(base ‖ model at T = 2) unless a KL weight is
varied, AdamW at lr 1e-3 with a 10 % linear warmup and gradient clipping at 1.0, and is scored before
(step 0) and after the budget by `nexus.validate.metrics.evaluate` against a frozen copy of the base
model: perplexity on domain_eval and general_eval, and KL(base ‖ model) at T = 1 per position.
Router statistics: `nexus collect` once on domain_train (40,000 tokens), analyzed by
`nexus.stats.analyze` into every selection used below. Machine: 2 shared CPU cores, one torch
thread per process; question 1 ran in one process while questions 3 and then 2 ran in another, on
a machine shared with other work, so step times are indicative only, and only within question 2
(whose rows all ran under that same load). This is a small budget on a tiny model: differences of a fraction of a
perplexity point are within seed noise unless the table's std says otherwise."""

NOTES = {
    1: """\
NEXUS with frozen routers, width 1× (concat_top8 is 8 experts wide by construction, hence 8× the
trainable parameters). `uniform_all32` is a hand-made pca_stats.json holding all 32 experts with
equal weights; `pca_top8_*` rank experts by PCA importance and merge with equal or
importance-proportional weights; `frequency_top8` ranks by routed top-k share (importance weights);
`aligned_top8` and `concat_top8` use the pca_top8 importance selection. KL columns are per position
on domain_eval. **zero** cannot learn its expert: with every weight 0, the gate/up and down weight
gradients are exactly 0 (checked: max |grad| = 0). On GPT-OSS the down-projection *bias* still gets a
gradient (it is added after the zero matrix), so a zero-initialized GPT-OSS shared expert trains
only a constant output vector per layer (128 numbers) — that, and nothing else, is what moves its
row after training. (docs/train.md says an all-zero expert has zero gradients; that holds for the
bias-free families, not for GPT-OSS.)""",
    2: """\
Each method runs in its own fresh process (`multiprocessing` spawn), so `peak RSS` is that process's
`ru_maxrss`: it includes the Python interpreter, torch, the evaluation data, the frozen base copy used
as evaluation reference and (for ESFT) as teacher, so differences between rows, not absolute values,
are the method's memory. Step time: median over the training steps, one thread, including the
teacher forward. NEXUS: the library's Trainer on the pca_top8 (importance) adapter; the trainable
router row trains the routers for the first half of the steps (`--no-freeze-router`, bias-freeze
ratio 0.5) and its parameter count includes them. LoRA: PEFT on attention q/k/v/o and the fused
expert weights through `target_parameters`, rank chosen so its count is closest to NEXUS's, teacher
= the same model under `disable_adapter()`. ESFT-style: the base's routed experts with the highest
routed top-k share per layer in the same router statistics are trained in place (the other experts'
slices get a zero gradient mask); top-1 matches NEXUS's parameter count exactly, top-2 doubles it.""",
    3: """\
Around the reference (pca_top8, importance weights, width 1×, KL weight 1, frozen router); one knob
changed at a time. Width M: the extra hidden units start with random gate/up rows and zero down
rows (output unchanged at init). KL weight 0 is pure LM loss (no teacher forward).""",
}

DISCUSSION = """\
See the ranked lists under each table: they are computed from the results, not typed.

- **What the init buys.** Every expert-derived init starts close to the base model (small step-0 KL),
  because the shared expert adds a plausible expert output to the routed mixture; `random` starts
  essentially at the base (its output is tiny), and `zero` starts exactly there. Whether the
  better-chosen starting point survives training is what the "after the budget" columns show; with
  this few steps the init decides most of the outcome, and differences smaller than the seed std
  should not be read as a ranking.
- **zero** does not learn beyond a per-layer bias (see question 1's note); it is a plumbing check,
  not a method.
- **Against LoRA and ESFT**, at matched parameter counts, read question 2's table for gained vs lost:
  the methods that edit the base's own weights (LoRA on attention + experts, ESFT's routed experts)
  change what every token routed there computes, while NEXUS adds a new path and leaves every base
  weight untouched (the base is recovered exactly by switching the shared experts off).
- **Limits of this study.** A 4.4M-parameter model, 40 steps, 24 evaluation sequences per split,
  one learning rate for every method (not tuned per method; LoRA and ESFT usually want their own),
  3 seeds for question 1 and 1 seed for questions 2 and 3. The result is a like-for-like comparison
  under one small budget, not a statement about large models or long training."""
