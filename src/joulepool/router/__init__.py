"""The request routing service: picks an endpoint per request (``joulepool router``)."""
