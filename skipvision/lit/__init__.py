"""Lightning layer: LightningModule, DataModule, callbacks and the recipe-driven fit/validate jobs."""
