"""tiderl's job layer (top): config composition, the CLI and cluster jobs (`launch`), the RL loop (`loop`), the
learner (`trainer`), the policy's build, warm start and export (`policy`), and the built-in tasks (`tasks`)."""
