"""Getting weights into the decoder: checkpoint reading (resident) and the layer-streamed schedule."""
