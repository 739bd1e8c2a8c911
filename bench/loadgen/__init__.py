"""Load generator: streaming OpenAI requests on an open- or closed-loop schedule, measured per request."""
