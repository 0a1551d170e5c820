"""The training loop, one role per module, data flowing down the list: `plan` (what a run
trains: model, optimiser, steps, train state), `steps` (the pure jitted functions), `experiment`
(the data and state on the devices), `feeds` (where batches come from: the device or the host),
`loop` (the run's phases, `train_and_evaluate`)."""
