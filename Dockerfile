# kvgate: KV-cache-aware inference gateway. Build: docker build -t kvgate:0.1.0 .
# The runtime image holds the gateway, Kubernetes discovery, the endpoint picker (kvgate epp) and the
# simulator's extras, not the benchmark's (numpy, matplotlib, locust): `kvgate bench` there says in one
# line what to install.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY router ./router
COPY prefixindex ./prefixindex
COPY bench ./bench
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[sim,kubernetes,epp]'

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kvgate" \
      org.opencontainers.image.description="KV-cache-aware, OpenAI-compatible gateway for vLLM fleets" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --create-home --uid 10001 kvgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
COPY config /etc/kvgate
USER 10001
EXPOSE 8080
# /health answers while the process serves; /ready (the readiness probe) also needs a healthy pod
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"]
ENTRYPOINT ["kvgate"]
CMD ["serve", "--config", "/etc/kvgate/kvgate.example.yaml", "--host", "0.0.0.0", "--port", "8080"]
