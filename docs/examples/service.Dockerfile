FROM python:3.12-slim
RUN python -m pip install --no-cache-dir allocpolicy
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
