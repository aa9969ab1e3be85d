"""The soft-token algorithm, on any `softar.model.VectorLM`.

- `tokens`: what a soft token is (a registry of definitions) and the noise put on one;
- `collapse`: soft -> hard operators, out-of-distribution scores and the collapse policy;
- `window`: the context layout, the summary slots, the generation-time memory hierarchy and the one window builder;
- `model`: `SoftAR`, a VectorLM with its slot encoder and layout: what training, generation and evaluation hold.
"""
