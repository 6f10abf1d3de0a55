"""Probing diagnostics for looped transformers (paper §3; docs/paper.md §6).

Modules: `metrics` (CKA, spectra, effective rank, skew: pure tensor math), `data` (sequences from `.bin/.idx`),
`collect` (run a model with `record=[]` and reduce the states to per-sample statistics), `loading` (checkpoint ->
model), `plots` (matplotlib figures), `cli` (`mesh-probe`).
"""
