"""Metrics, one module per question: `lm` (how well it predicts text), `soft_tokens` (what its soft outputs are
worth), `context` (what the summary slots hold), `generation` (how coherent free-running soft generation stays), and
`run`, which evaluates a run directory with all of them (`softar eval`)."""
