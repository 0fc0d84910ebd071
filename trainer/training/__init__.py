"""The training run, on top of everything else: ``config`` (flags + TOML) -> ``settings`` (typed groups) ->
``networks`` (base, adapters, denoisers), ``optim``, ``memory``, ``state`` (resumable folders), ``saving`` (adapter
files), ``samples`` (sample prompts, quality report) -> ``loop`` (the run) -> ``main`` (the entry point)."""
