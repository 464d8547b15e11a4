"""The API's routes, one module per resource; each handler gets the replica's state as a dependency."""

from fastapi import Depends

from es_ray.serve import auth

ADMIN = [Depends(auth.admin)]  # dependencies of every admin or write route
