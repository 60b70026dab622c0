DROP TABLE artifacts;
DROP TABLE recording_jobs;
DROP TABLE session_recordings;
DROP TYPE artifact_type;
DROP TYPE job_state;
DROP TYPE processing_status;
