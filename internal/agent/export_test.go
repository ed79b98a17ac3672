package agent

import "time"

// SetKeepalive changes the keepalive timing for a test and returns the undo.
func SetKeepalive(interval, timeout time.Duration) func() {
	oi, ot := keepaliveInterval, keepaliveTimeout
	keepaliveInterval, keepaliveTimeout = interval, timeout
	return func() { keepaliveInterval, keepaliveTimeout = oi, ot }
}
