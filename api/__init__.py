"""The REST API: FastAPI app factory, routes, schemas, error mapping and plotting."""
