"""The HTTP side: routes, auth, limits, request -> Frame, Context -> response, errors to JSON in one place."""
