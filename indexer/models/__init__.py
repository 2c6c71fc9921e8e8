"""Face models: MTCNN detection, InceptionResnetV1 embedding, and where their weights come from."""
