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
thread per process; question 1 and question 3 ran side by side, on a machine shared with other
work; question 2 ran alone afterwards (a first run of it alongside question 1 gave the same
perplexities, the runs being deterministic, and different step times). Step times are indicative
only, and only within question 2. This is a small budget on a tiny model: differences of a fraction of a
perplexity point are within seed noise unless the table's std says otherwise."""

NOTES = {
    1: """\
NEXUS with frozen routers, width 1× (concat_top8 is 8 experts wide by construction, hence 8× the
trainable parameters). `uniform_all32` is a hand-made pca_stats.json holding all 32 experts with
equal weights; `pca_top8_*` rank experts by PCA importance and merge with equal or
importance-proportional weights; `frequency_top8` ranks by routed top-k share (importance weights);
`aligned_top8` and `concat_top8` use the pca_top8 importance selection. KL columns are per position
on domain_eval. **zero** cannot learn its expert: with every weight 0, the gate/up and down weight
gradients are exactly 0 (measured below the table). On GPT-OSS the down-projection *bias* still gets a
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
slices get a zero gradient mask); top-1 matches NEXUS's parameter count exactly, top-2 doubles it.
"Domain gained" and "general lost" are relative to the base model's perplexity (not to step 0;
NEXUS's step 0 already differs from the base, LoRA's and ESFT's do not). Means over the seeds run.""",
    3: """\
Around the reference (pca_top8, importance weights, width 1×, KL weight 1, frozen router); one knob
changed at a time. Width M: the extra hidden units start with random gate/up rows and zero down
rows (output unchanged at init). KL weight 0 is pure LM loss (no teacher forward).""",
}

DISCUSSION = """\
The figures are in the tables and ranked lists above (computed from the results JSON); this section
only reads them. Where a question ran one seed, a difference there is a hint, not a result.

- **Init (question 1).** The expert-derived inits do *not* win at equal size: under this budget
  `random` (a near-silent expert, step-0 KL close to zero) ends with lower domain perplexity than every width-1× merge of routed experts
  (pca, frequency, aligned, uniform), by more than one seed std. Among the merges, frequency and
  aligned selection end slightly ahead of the pca-ranked ones, equal vs importance weights make no
  difference beyond noise, and the uniform average of all 32 experts is the weakest merge (it starts
  closest to the base of the merges, but learns least). A plausible reading, not tested here: a
  weight-space average of unrelated experts is a poor, already-"committed" starting point, while a
  small random expert can move freely toward the domain. `concat_top8` is best by far after
  training, but it is 8× wider (8× the trainable parameters), starts furthest from the base (it adds
  the full weighted expert output, visibly hurting both perplexities at step 0) and ends with the
  largest general-perplexity loss; compare it with question 3's width sweep, not with the 1× rows.
- **zero** learns only a per-layer output bias (question 1's note): a plumbing check, not a method.
- **Methods (question 2).** At NEXUS's parameter count, ESFT-style training of each layer's most-used
  routed expert gained the most domain perplexity: clearly ahead of NEXUS with a frozen router and
  of LoRA, but only within the seed std of NEXUS with a trainable router (whose count includes the
  routers). NEXUS with a frozen router came next, and LoRA at a similar count gained the least.
  None of them lost general perplexity beyond seed noise under this short budget (the domain is
  Python code too, so general text even improves slightly for most). So on this model NEXUS does not
  win on quality per parameter; what it keeps is structural: every base weight is untouched and the
  base is recovered exactly by switching the shared experts off, whereas ESFT and LoRA (merged)
  overwrite the base.
  Memory: the ESFT rows hold gradients and AdamW state for *all* experts' full tensors (the mask
  zeroes the gradient, it does not shrink the parameter), which is why they use the most memory
  here; a real ESFT implementation would split the trained experts out. Step times are close at
  this size; read them with the load caveat of the introduction.
- **Sensitivity (question 3).** Wider shared experts help steadily (more parameters, more gain);
  the KL weight trades domain gain against general retention as expected (pure LM loss gains most on
  the domain and loses most on general text); top-K of the merge barely matters.
- **Limits.** A 4.4M-parameter model, 40 steps, 24 evaluation sequences per split, one learning rate
  for every method (untuned; ESFT and LoRA may prefer others, NEXUS too), router statistics from
  the domain training split. A like-for-like comparison under one small budget, not a statement
  about large models or long training."""
