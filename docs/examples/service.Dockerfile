FROM python:3.12-slim
# The runtime is a C library that the install builds: a compiler for this
# step only (slim images have none), removed again in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev make \
    && python -m pip install --no-cache-dir allocpolicy \
    && apt-get purge -y --auto-remove gcc libc6-dev make && rm -rf /var/lib/apt/lists/*
# A fixed path for the library of this installation: ENV cannot run
# `allocpolicy lib`, so link it once at build time.
RUN ln -s "$(allocpolicy lib)" /usr/local/lib/liballocpolicy.so
COPY service_policy.toml /etc/allocpolicy/service.toml
COPY service.py /app/service.py
# Every process of the container, and its children, starts under the runtime
# with this policy (set after the RUN steps, which need no budgets).
ENV LD_PRELOAD=/usr/local/lib/liballocpolicy.so
ENV ALLOCPOLICY_POLICY=/etc/allocpolicy/service.toml
CMD ["python", "/app/service.py"]
