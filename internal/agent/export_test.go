package agent

import "time"

// SetKeepalive changes the keepalive timing for a test and returns the undo.
func SetKeepalive(interval, timeout time.Duration) func() {
	oi, ot := keepaliveInterval, keepaliveTimeout
	keepaliveInterval, keepaliveTimeout = interval, timeout
	return func() { keepaliveInterval, keepaliveTimeout = oi, ot }
}

// FreeDataPorts is the number of data ports free for a transfer.
func (c *Client) FreeDataPorts() int { return c.data.freePorts() }

// Cipher is the negotiated cipher of the host's writes.
func (c *Client) Cipher() string { return c.cipher() }

// SetDataDrainGrace changes how long a data stream may stay silent after
// its channel closed, for a test, and returns the undo.
func SetDataDrainGrace(d time.Duration) func() {
	o := dataDrainGrace
	dataDrainGrace = d
	return func() { dataDrainGrace = o }
}
