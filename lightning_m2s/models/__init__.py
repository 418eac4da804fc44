"""Model core: SVD UNet with stereo conditioning, disocclusion attention, frozen video VAE, embeddings, refiner."""
