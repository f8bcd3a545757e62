"""Human preferences: a label store in SQLite, a local labelling page, and the paths by which agents
learn from what a person clicked (docs/design.md, "Human labels"; the ``human`` oracle kind).

- :mod:`rl_align.labels.store`: one SQLite file per labelling project (WAL, transactional writes);
- :mod:`rl_align.labels.render`: clips of stored segments, offscreen with the renderer ``rl-align eval --video`` uses;
- :mod:`rl_align.labels.server`: ``rl-align label <store>``, the page (Starlette + uvicorn, 127.0.0.1 by default);
- :mod:`rl_align.labels.collect`: pairs from a policy's rollouts into the store, and the synthetic labeller;
- :mod:`rl_align.labels.learn`: the SAIL family's DPO part and RLHF's reward model on the stored labelled pairs.

Only ``store`` is imported by the oracles (it needs nothing but the standard library and NumPy).
"""
