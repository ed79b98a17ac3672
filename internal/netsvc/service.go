package netsvc

import "sync"

// Service is a running server; it stops when the context it was started
// with is cancelled.
type Service struct {
	wg sync.WaitGroup
}

// Wait returns once the service stopped: its sockets are closed and its
// goroutines ended.
func (s *Service) Wait() { s.wg.Wait() }
