"""Built-in training recipes, shipped with the package as `trainer.recipes` (`memtrain recipes`)."""
