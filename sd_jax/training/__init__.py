"""Training, one role per module. The loop, data flowing down the list: `plan` (what a run
trains: model, optimiser, steps, train state), `steps` (the pure jitted functions), `experiment`
(the data and state on the devices), `feeds` (where batches come from: the device or the host),
`loop` (the run's phases, `train_and_evaluate`). What the loop uses: `parallel` (the device mesh),
`compiler` (the XLA options of our jitted calls), `compiled` (reading a compiled program),
`checkpoints`, `records` (a run's files in its workdir) and `provenance` (what a run ran on)."""
