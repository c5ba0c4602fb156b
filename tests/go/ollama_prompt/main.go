// Command ollama_prompt renders chat prompts with Ollama's own template package (the version in
// go.mod), for tests that compare pipeline/ollama_template.py's renderer with it.
//
// stdin: a JSON list of {"template": str, "system": str, "messages": [{"role", "content"}]}
// stdout: a JSON list with, per request, {"prompt": str} or {"error": str}.
//
// The Modelfile's SYSTEM is added as /api/chat does it (server/routes.go ChatHandler): as a first
// system message unless the conversation starts with one.
package main

import (
	"bytes"
	"encoding/json"
	"os"

	"github.com/ollama/ollama/api"
	"github.com/ollama/ollama/template"
)

type request struct {
	Template string        `json:"template"`
	System   string        `json:"system"`
	Messages []api.Message `json:"messages"`
}

type result struct {
	Prompt *string `json:"prompt,omitempty"`
	Error  string  `json:"error,omitempty"`
}

func render(r request) result {
	tmpl, err := template.Parse(r.Template)
	if err != nil {
		return result{Error: err.Error()}
	}
	messages := r.Messages
	if r.System != "" && (len(messages) == 0 || messages[0].Role != "system") {
		messages = append([]api.Message{{Role: "system", Content: r.System}}, messages...)
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, template.Values{Messages: messages}); err != nil {
		return result{Error: err.Error()}
	}
	prompt := out.String()
	return result{Prompt: &prompt}
}

func main() {
	var requests []request
	if err := json.NewDecoder(os.Stdin).Decode(&requests); err != nil {
		panic(err)
	}
	results := make([]result, len(requests))
	for i, r := range requests {
		results[i] = render(r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
