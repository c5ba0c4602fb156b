module llm-gitops/tests/ollama_prompt

go 1.24.0

require github.com/ollama/ollama v0.11.4

require (
	github.com/agnivade/levenshtein v1.1.1 // indirect
	golang.org/x/crypto v0.36.0 // indirect
	golang.org/x/sys v0.31.0 // indirect
)
