"""The contract the layers above share: model bundles, preprocessing and the messages between stages."""
