//! The adapters' suites, compiled as one test binary: every case of `blob` runs on the local
//! directory and on S3 (the server `deploy/s3.sh` starts), every case of `queue` on the
//! in-process queue and on RabbitMQ.

mod blob;
mod queue;
