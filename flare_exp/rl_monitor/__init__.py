"""Watching a GRPO run: readable rollouts (:mod:`.rollouts`, :mod:`.rollouts_html`), task metrics on a held-out
subset during training (:mod:`.heldout`), and the reward-hacking alarm (:mod:`.alarm`). The rl stage attaches
them as Trainer callbacks (:func:`.callbacks.monitor_callbacks`)."""
