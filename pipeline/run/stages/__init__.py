"""The scoring dataset's stages, one module each, in order: read, parse, dedupe, sample, then per student
tokenize and score, then explode. Each module declares its stage (the columns it reads and adds) beside
the function that reads and adds them; `pipeline.run.dataset` chains them."""
